#!/usr/bin/env python3
"""Offline checks of the deployment files; tests/deploy-check.sh runs this inside its virtualenv.

Checks (one output line each, `ok` or `FAIL`, then `deploy-check: N passed, M failed`):
  help        the flags, environment variables, defaults and health paths of the three binaries,
              read from `--help` of the built binaries (the source of truth for the drift checks)
  k8s schema  every overlay under k8s/overlays (and each of them with every component under
              k8s/components) renders with `kubectl kustomize`, and every object validates
              strictly against the Kubernetes 1.31 schemas (kubernetes-validate --strict; an
              object whose kind it has no schema for fails too)
  k8s drift   in each render: every env var / envFrom key / flag set on a secsync container is one
              the binary accepts (a downward-API variable that only feeds a later variable's
              $(NAME) substitution is exempt); listen addresses are not loopback; container ports, probe ports,
              Service targetPorts, NetworkPolicy ports and the Ingress backend all reach the
              binary's listen port; HTTP probe paths are health paths the binary serves; gRPC
              probes name a service the persistence health service reports; no exec probe or hook
              (the image has no shell); terminationGracePeriodSeconds >= preStop + drain deadline;
              the persistence URL names a HEADLESS Service of persistence pods on its port;
              HPA/PDB/NetworkPolicy selectors and targets match the rendered workloads
  k8s security in each render: every secsync container runs non-root, with a read-only root
              filesystem, no privilege escalation and all capabilities dropped
  hpa metric  the pods metric of k8s/components/hpa-connections is the one the Prometheus Adapter
              rule next to it exposes
  compose schema  docker-compose.yml validates against the Compose specification schema kept in
              deploy/schema (check-jsonschema)
  compose drift   the same drift rules for the secsync services of docker-compose.yml and for
              deploy/haproxy/haproxy.cfg; depends_on targets exist and `service_healthy` targets
              have a health check; bind-mounted files exist
  dockerfile  RUST_VERSION equals rust-toolchain.toml's channel; every runtime target's ENV,
              EXPOSE and ENTRYPOINT match its binary; COPY sources exist and are not excluded by
              .dockerignore; the builder builds every binary the targets copy
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.31.0"
BINARIES = ("secsync-gateway", "secsync-persistence", "secsync")

# Environment variables the binaries read besides their flags' (which `--help` lists).
EXTRA_ENV = {
    # services/telemetry: tracing_subscriber's EnvFilter::try_from_default_env.
    "RUST_LOG": "log filter (services/telemetry)",
    # The OpenTelemetry SDK's standard variables; services/telemetry reads them once the
    # observability issue wires the export (set in docker-compose.yml so the stack is ready).
    "OTEL_SERVICE_NAME": "OpenTelemetry SDK",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "OpenTelemetry SDK",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "OpenTelemetry SDK",
    "OTEL_RESOURCE_ATTRIBUTES": "OpenTelemetry SDK",
}


# --------------------------------------------------------------------------------------------
# The binaries' interface, from --help
# --------------------------------------------------------------------------------------------


@dataclass
class Binary:
    name: str
    flags: dict[str, dict] = field(default_factory=dict)  # "--listen" -> {env, default}
    env: dict[str, str] = field(default_factory=dict)  # env name -> flag
    health_paths: set[str] = field(default_factory=set)
    grpc_services: set[str] | None = None  # gRPC health service names, None: not a gRPC server

    def default(self, env_name: str) -> str | None:
        flag = self.env.get(env_name)
        return self.flags[flag].get("default") if flag else None

    @property
    def listen_env(self) -> str:
        return self.flags["--listen"]["env"]

    @property
    def drains(self) -> bool:
        return "--drain-seconds" in self.flags


OPTION_RE = re.compile(r"^\s{2,}(?:-[A-Za-z], )?(--[a-z0-9][a-z0-9-]*)")


def parse_help(name: str, text: str) -> Binary:
    binary = Binary(name)
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = OPTION_RE.match(line)
        if m:
            blocks.append((m.group(1), [line]))
        elif blocks:
            blocks[-1][1].append(line)
    for flag, lines in blocks:
        body = " ".join(lines)
        info: dict = {}
        if m := re.search(r"\[env: ([A-Z0-9_]+)", body):
            info["env"] = m.group(1)
            binary.env[m.group(1)] = flag
        if m := re.search(r"\[default: ([^\]]*)\]", body):
            info["default"] = m.group(1).strip('"')
        binary.flags[flag] = info
        if flag == "--listen":
            # "Address to serve WebSocket clients (and /healthz, /readyz) on".
            binary.health_paths = set(re.findall(r"(?<![\w/`])(/[a-z][a-z0-9_-]*)", body))
    return binary


def load_binaries(bin_dir: Path) -> dict[str, Binary]:
    binaries = {}
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200"}
    for name in BINARIES:
        path = bin_dir / name
        if not os.access(path, os.X_OK):
            raise CheckError(
                f"{path} not found: build the binaries first "
                "(cargo build --release --bins -p secsync-gateway -p secsync-persistence -p secsync)"
            )
        out = subprocess.run([str(path), "--help"], capture_output=True, text=True, env=clean_env)
        if out.returncode != 0:
            raise CheckError(f"{path} --help exited with {out.returncode}: {out.stderr.strip()}")
        binary = parse_help(name, out.stdout)
        if "--listen" not in binary.flags or "env" not in binary.flags["--listen"]:
            raise CheckError(f"{name} --help lists no --listen flag with an environment variable")
        binaries[name] = binary
    # The persistence service serves grpc.health.v1 for "" and for its Persistence service,
    # whose full name comes from the proto contract.
    proto = (ROOT / "proto/secsync/persistence/v1/persistence.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", proto, re.M).group(1)
    services = re.findall(r"^service\s+(\w+)", proto, re.M)
    binaries["secsync-persistence"].grpc_services = {""} | {f"{package}.{s}" for s in services}
    for name in ("secsync-gateway", "secsync"):
        if not binaries[name].health_paths:
            raise CheckError(f"{name} --help no longer names its health paths (/healthz, /readyz)")
    return binaries


class CheckError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Helpers shared by the Kubernetes, compose and Dockerfile rules
# --------------------------------------------------------------------------------------------


def image_binary(image: str | None) -> str | None:
    """secsync-gateway, registry/x/secsync-gateway:1.0@sha256:... -> secsync-gateway."""
    if not image:
        return None
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    last = last.split(":")[0]
    return last if last in BINARIES else None


def parse_listen(value: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", value.strip())
    return (m.group(1), int(m.group(2))) if m else None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def duration_seconds(value) -> float | None:
    """Compose durations (25s, 1m30s, 500ms) and plain numbers."""
    if isinstance(value, (int, float)):
        return float(value)
    total, matched = 0.0, False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value)):
        matched = True
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
    return total if matched else None


def check_flags(where: str, binary: Binary, args: list[str], errors: list[str]) -> dict[str, str]:
    """Flags in a command line; returns {env name: value} for the flags given a value."""
    values = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--"):
            flag, _, value = arg.partition("=")
            if flag not in binary.flags:
                errors.append(f"{where}: flag {flag} is not accepted by {binary.name} (--help)")
            else:
                env = binary.flags[flag].get("env")
                if not value and i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                    value = str(args[i + 1])
                    i += 1
                if env:
                    values[env] = value
        i += 1
    return values


def check_env_names(where: str, binary: Binary, names, errors: list[str]) -> None:
    for name in names:
        if name not in binary.env and name not in EXTRA_ENV:
            errors.append(
                f"{where}: environment variable {name} is not accepted by {binary.name} "
                f"(not in its --help)"
            )


def effective_listen(where, binary, config, image_env, errors) -> int | None:
    env = binary.listen_env
    value = config.get(env, image_env.get(env, binary.default(env)))
    if value is None:
        errors.append(f"{where}: cannot tell {binary.name}'s listen address ({env})")
        return None
    parsed = parse_listen(value)
    if not parsed:
        errors.append(f"{where}: {env}={value!r} is not host:port")
        return None
    host, port = parsed
    if is_loopback(host):
        errors.append(
            f"{where}: {env}={value} listens on loopback, unreachable from outside the container"
        )
    return port


def check_message_limits(where: str, gateways, persistences, errors: list[str]) -> None:
    """README: persistence's --max-message-bytes >= the gateways' --max-frame-bytes + 64 KiB.
    `gateways` and `persistences` are (Binary, effective config) pairs."""

    def value(binary: Binary, config: dict, env: str) -> int | None:
        raw = config.get(env, binary.default(env))
        return int(raw) if raw is not None and str(raw).isdigit() else None

    for gateway, gateway_config in gateways:
        frame = value(gateway, gateway_config, "SECSYNC_MAX_FRAME_BYTES")
        for persistence, persistence_config in persistences:
            message = value(persistence, persistence_config, "SECSYNC_MAX_MESSAGE_BYTES")
            if frame is not None and message is not None and message < frame + 64 * 1024:
                errors.append(
                    f"{where}: persistence SECSYNC_MAX_MESSAGE_BYTES {message} < the gateways' "
                    f"SECSYNC_MAX_FRAME_BYTES {frame} + 64 KiB"
                )


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    expose: list[int] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    copies: list[tuple[str | None, list[str]]] = field(default_factory=list)  # (from, sources)
    runs: list[str] = field(default_factory=list)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment inside a continuation
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def parse_env_instruction(rest: str) -> dict[str, str]:
    tokens = shlex.split(rest)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(path.read_text()):
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append(Stage(name=(m.group(2) or str(len(stages))), base=m.group(1)))
        elif not stages:
            continue
        elif keyword == "ENV":
            stages[-1].env.update(parse_env_instruction(rest))
        elif keyword == "EXPOSE":
            stages[-1].expose += [int(p.split("/")[0]) for p in rest.split()]
        elif keyword == "ENTRYPOINT":
            stages[-1].entrypoint = yaml.safe_load(rest) if rest.startswith("[") else rest.split()
        elif keyword == "COPY":
            tokens = shlex.split(rest)
            source_stage = None
            plain = []
            for token in tokens:
                if token.startswith("--from="):
                    source_stage = token.split("=", 1)[1]
                elif not token.startswith("--"):
                    plain.append(token)
            stages[-1].copies.append((source_stage, plain[:-1]))
        elif keyword == "RUN":
            stages[-1].runs.append(rest)
    # Inherit ENV from a stage built FROM another stage.
    by_name = {s.name: s for s in stages}
    for stage in stages:
        parent = by_name.get(stage.base)
        if parent:
            stage.env = {**parent.env, **stage.env}
            stage.expose = stage.expose or parent.expose
            stage.entrypoint = stage.entrypoint or parent.entrypoint
    return args, stages


def glob_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return f"^{out}$"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it or one of its
    parent directories decides (`!` re-includes), as Docker does."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.match(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def image_targets(stages: list[Stage]) -> dict[str, Stage]:
    """Dockerfile targets that run a secsync binary: target name -> stage."""
    out = {}
    for stage in stages:
        if stage.entrypoint and image_binary(stage.entrypoint[0].rsplit("/", 1)[-1]):
            out[stage.name] = stage
    return out


def target_binary(stage: Stage) -> str:
    return stage.entrypoint[0].rsplit("/", 1)[-1]


def check_dockerfile(binaries: dict[str, Binary]) -> list[str]:
    errors: list[str] = []
    args, stages = parse_dockerfile(ROOT / "Dockerfile")
    toolchain = (ROOT / "rust-toolchain.toml").read_text()
    channel = re.search(r'^channel\s*=\s*"([^"]+)"', toolchain, re.M).group(1)
    if args.get("RUST_VERSION") != channel:
        errors.append(
            f"Dockerfile: ARG RUST_VERSION={args.get('RUST_VERSION')} but rust-toolchain.toml "
            f"pins {channel}"
        )
    builders = [s for s in stages if s.base.split("/")[-1].startswith("rust:")]
    if not builders or "${RUST_VERSION}" not in builders[0].base:
        errors.append("Dockerfile: no builder stage FROM rust:${RUST_VERSION}-...")
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for stage in stages:
        for source_stage, sources in stage.copies:
            if source_stage:
                continue
            for source in sources:
                if not (ROOT / source).exists():
                    errors.append(f"Dockerfile stage {stage.name}: COPY {source}: no such path")
                elif dockerignored(source, patterns):
                    errors.append(
                        f"Dockerfile stage {stage.name}: COPY {source} is excluded by .dockerignore"
                    )
    targets = image_targets(stages)
    built = " ".join(" ".join(s.runs) for s in builders)
    for binary_name in BINARIES:
        if binary_name not in [target_binary(s) for s in targets.values()]:
            errors.append(f"Dockerfile: no target runs {binary_name}")
        if f"-p {binary_name}" not in built:
            errors.append(f"Dockerfile: the builder does not build package {binary_name}")
    for name, stage in targets.items():
        binary = binaries[target_binary(stage)]
        where = f"Dockerfile target {name} ({binary.name})"
        check_env_names(where, binary, stage.env, errors)
        port = effective_listen(where, binary, stage.env, {}, errors)
        if port is not None and stage.expose != [port]:
            errors.append(f"{where}: EXPOSE {stage.expose} but it listens on port {port}")
        copied = [src for frm, srcs in stage.copies if frm for src in srcs]
        if not any(src.rsplit("/", 1)[-1] == binary.name for src in copied):
            errors.append(f"{where}: does not COPY the {binary.name} binary from the builder")
    return errors


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def render(kubectl: str, directory: Path) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(
            f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{out.stderr.strip()}"
        )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render_with_component(kubectl: str, overlay: Path, component: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=ROOT / ".venv-deploy") as tmp:
        # kustomize refuses absolute paths; relative ones are resolved from the real directory.
        real = os.path.realpath(tmp)
        rel = lambda p: os.path.relpath(os.path.realpath(p), real)  # noqa: E731
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {rel(overlay)}\ncomponents:\n  - {rel(component)}\n"
        )
        return render(kubectl, Path(tmp))


def validate_schema(validator: str, objects: list[dict]) -> list[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT / ".venv-deploy") as f:
        yaml.safe_dump_all(objects, f, sort_keys=False)
        f.flush()
        out = subprocess.run(
            [validator, "--strict", "--kubernetes-version", K8S_VERSION, "--quiet", f.name],
            capture_output=True,
            text=True,
        )
    problems = [
        line.replace(f.name, "render")
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip()
    ]
    if out.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited with {out.returncode}")
    return problems


def pod_templates(objects):
    for obj in objects:
        kind = obj.get("kind")
        spec = obj.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield obj, spec.get("template") or {}
        elif kind == "CronJob":
            yield obj, ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        elif kind == "Pod":
            yield obj, obj


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector ({matchLabels, matchExpressions}; {} selects everything) or a Service's
    plain label map."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels = selector.get("matchLabels") or {}
    else:
        match_labels = selector
    for key, value in match_labels.items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class OurContainer:
    where: str
    workload: dict
    pod: dict
    container: dict
    binary: Binary
    config: dict[str, str]
    listen_port: int | None


def check_k8s_drift(objects, binaries, image_env) -> list[str]:
    errors: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    ours: list[OurContainer] = []
    workloads = list(pod_templates(objects))

    for obj, template in workloads:
        pod = template.get("spec") or {}
        for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            binary_name = image_binary(container.get("image"))
            if not binary_name:
                continue
            binary = binaries[binary_name]
            where = f"{obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            config: dict[str, str] = {}
            names = []
            for ref in container.get("envFrom") or []:
                prefix = ref.get("prefix", "")
                if "configMapRef" in ref:
                    cm = configmaps.get(ref["configMapRef"]["name"])
                    if cm is None:
                        errors.append(
                            f"{where}: envFrom ConfigMap {ref['configMapRef']['name']} is not in the render"
                        )
                        continue
                    for key, value in (cm.get("data") or {}).items():
                        names.append(prefix + key)
                        config[prefix + key] = str(value)
                elif "secretRef" in ref:
                    secret = secrets.get(ref["secretRef"]["name"])
                    if secret is None:
                        errors.append(
                            f"{where}: envFrom Secret {ref['secretRef']['name']} is not in the render, "
                            "so its keys cannot be checked: use env[].valueFrom.secretKeyRef"
                        )
                        continue
                    for key in list((secret.get("data") or {})) + list(
                        (secret.get("stringData") or {})
                    ):
                        names.append(prefix + key)
                        config[prefix + key] = "<secret>"
            env_list = container.get("env") or []
            for i, env in enumerate(env_list):
                # A downward-API variable that only feeds a later variable's $(NAME) substitution
                # (e.g. POD_NAME into OTEL_RESOURCE_ATTRIBUTES) is not read by the binary.
                downward = {"fieldRef", "resourceFieldRef"} & set(env.get("valueFrom") or {})
                if downward and any(
                    f"$({env['name']})" in str(later.get("value", ""))
                    for later in env_list[i + 1 :]
                ):
                    continue
                names.append(env["name"])
                config[env["name"]] = str(
                    env.get("value", "<from " + next(iter(env.get("valueFrom") or {"?": 0})) + ">")
                )
            check_env_names(where, binary, names, errors)
            if container.get("command"):
                cmd = container["command"]
                if not str(cmd[0]).endswith(binary.name):
                    errors.append(f"{where}: command {cmd[0]} is not the {binary.name} binary")
                config.update(check_flags(where, binary, cmd[1:], errors))
            config.update(check_flags(where, binary, container.get("args") or [], errors))
            port = effective_listen(where, binary, config, image_env.get(binary.name, {}), errors)
            ours.append(OurContainer(where, obj, pod, container, binary, config, port))

    if not ours:
        errors.append("no secsync container in this render")

    def container_port(c: OurContainer, port) -> int | None:
        if isinstance(port, int):
            return port
        for p in c.container.get("ports") or []:
            if p.get("name") == port:
                return p["containerPort"]
        if str(port).isdigit():
            return int(port)
        return None

    def health_port(c: OurContainer) -> int | None:
        """The port of persistence's plaintext health listener (SECSYNC_HEALTH_LISTEN), if set."""
        value = c.config.get("SECSYNC_HEALTH_LISTEN")
        if not value or ":" not in value:
            return None
        port = value.rsplit(":", 1)[1]
        return int(port) if port.isdigit() else None

    for c in ours:
        ports = c.container.get("ports") or []
        served = {c.listen_port, health_port(c)} - {None}
        if c.listen_port is not None:
            if not ports:
                errors.append(f"{c.where}: declares no containerPort (listens on {c.listen_port})")
            for p in ports:
                if p["containerPort"] not in served:
                    errors.append(
                        f"{c.where}: containerPort {p['containerPort']} ({p.get('name')}) but "
                        f"{c.binary.listen_env} listens on {c.listen_port}"
                    )
        pre_stop = 0.0
        lifecycle = c.container.get("lifecycle") or {}
        for hook_name, hook in lifecycle.items():
            if "exec" in hook:
                errors.append(
                    f"{c.where}: {hook_name} exec hook, but the image has no shell or tools"
                )
            if hook_name == "preStop" and "sleep" in hook:
                pre_stop = float(hook["sleep"]["seconds"])
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.container.get(probe_name)
            if not probe:
                continue
            label = f"{c.where}: {probe_name}"
            if "exec" in probe:
                errors.append(f"{label} runs a command, but the image has no shell or tools")
            if "httpGet" in probe:
                path = probe["httpGet"].get("path", "/")
                if path.split("?")[0] not in c.binary.health_paths:
                    errors.append(
                        f"{label} path {path} is not a health path of {c.binary.name} "
                        f"({', '.join(sorted(c.binary.health_paths)) or 'none'})"
                    )
            if "grpc" in probe:
                service = probe["grpc"].get("service") or ""
                if c.binary.grpc_services is None:
                    errors.append(f"{label} is a gRPC probe but {c.binary.name} serves no gRPC")
                elif service not in c.binary.grpc_services:
                    errors.append(
                        f"{label} asks for gRPC health service {service!r}; {c.binary.name} reports "
                        f"{sorted(c.binary.grpc_services)}"
                    )
            for action in ("httpGet", "grpc", "tcpSocket"):
                if action in probe:
                    port = container_port(c, probe[action].get("port"))
                    if port not in served:
                        errors.append(
                            f"{label} port {probe[action].get('port')} is not the listen port {c.listen_port}"
                        )
        if c.binary.drains:
            drain_env = "SECSYNC_DRAIN_SECONDS"
            drain = float(c.config.get(drain_env, c.binary.default(drain_env) or 0))
            grace = c.pod.get("terminationGracePeriodSeconds", 30)
            if grace < pre_stop + drain:
                errors.append(
                    f"{c.where}: terminationGracePeriodSeconds {grace} < preStop {pre_stop:g} s + "
                    f"drain {drain:g} s ({drain_env}): connections would be killed mid-drain"
                )

    def pods_selected(selector) -> list[tuple[dict, dict]]:
        return [
            (obj, template)
            for obj, template in workloads
            if selector_matches(selector, (template.get("metadata") or {}).get("labels") or {})
        ]

    def ours_selected(selector) -> list[OurContainer]:
        selected = {id(t) for _, t in pods_selected(selector)}
        return [c for c in ours if id(next(t for o, t in workloads if o is c.workload)) in selected]

    for name, svc in by_kind.get("Service", {}).items():
        selector = (svc.get("spec") or {}).get("selector")
        if not selector:
            continue
        selected = ours_selected(selector)
        if not pods_selected(selector):
            errors.append(
                f"Service/{name}: its selector {selector} matches no pod template in the render"
            )
        for c in selected:
            for p in svc["spec"].get("ports") or []:
                target = p.get("targetPort", p["port"])
                resolved = container_port(c, target)
                if resolved != c.listen_port:
                    errors.append(
                        f"Service/{name} port {p.get('name', p['port'])}: targetPort {target} does not "
                        f"reach {c.binary.name}'s listen port {c.listen_port}"
                    )

    # The gateway's persistence URL: a headless Service of persistence pods, on their port.
    for c in ours:
        url = c.config.get("SECSYNC_PERSISTENCE_URL")
        if c.binary.name != "secsync-gateway":
            continue
        if url is None:
            errors.append(f"{c.where}: SECSYNC_PERSISTENCE_URL is not set (default is loopback)")
            continue
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        svc = by_kind.get("Service", {}).get(host.split(".")[0])
        if svc is None:
            errors.append(
                f"{c.where}: SECSYNC_PERSISTENCE_URL host {host} is not a Service of this render"
            )
            continue
        if (svc["spec"].get("clusterIP") or "") != "None":
            errors.append(
                f"{c.where}: Service/{svc['metadata']['name']} behind SECSYNC_PERSISTENCE_URL is not "
                "headless (clusterIP: None): each gateway would be pinned to one persistence pod"
            )
        backends = ours_selected(svc["spec"].get("selector"))
        if not backends or any(b.binary.name != "secsync-persistence" for b in backends):
            errors.append(f"{c.where}: Service/{host} does not select the persistence pods")
        for b in backends:
            if port != b.listen_port:
                errors.append(
                    f"{c.where}: SECSYNC_PERSISTENCE_URL port {port} but persistence listens on {b.listen_port}"
                )
    for c in ours:
        url = c.config.get("SECSYNC_NATS_URL")
        if url:
            host = urlsplit(url).hostname or ""
            if "." not in host and host not in by_kind.get("Service", {}):
                errors.append(
                    f"{c.where}: SECSYNC_NATS_URL host {host} is not a Service of this render"
                )

    for name, ing in by_kind.get("Ingress", {}).items():
        for rule in ing["spec"].get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backend = path["backend"].get("service") or {}
                svc = by_kind.get("Service", {}).get(backend.get("name"))
                if svc is None:
                    errors.append(
                        f"Ingress/{name}: backend Service {backend.get('name')} is not in the render"
                    )
                    continue
                port = backend.get("port") or {}
                if not any(
                    (
                        p.get("name") == port.get("name")
                        if "name" in port
                        else p["port"] == port.get("number")
                    )
                    for p in svc["spec"].get("ports") or []
                ):
                    errors.append(
                        f"Ingress/{name}: Service/{svc['metadata']['name']} has no port {port}"
                    )

    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            errors.append(
                f"HorizontalPodAutoscaler/{name}: scale target {ref['kind']}/{ref['name']} is not in the render"
            )
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is not None and "replicas" in (target.get("spec") or {}):
            errors.append(
                f"HorizontalPodAutoscaler/{name}: {ref['kind']}/{ref['name']} sets replicas, which "
                "every apply would reset under the autoscaler"
            )
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not pods_selected(pdb["spec"].get("selector")):
            errors.append(f"PodDisruptionBudget/{name}: its selector matches no pod template")
    for name, policy in by_kind.get("NetworkPolicy", {}).items():
        spec = policy["spec"]
        selected = ours_selected(spec.get("podSelector"))
        for rule in spec.get("ingress") or []:
            for peer in rule.get("from") or []:
                # Peers are checked for policies on pods of this render (not, e.g., on the
                # operator-managed Postgres pods of production).
                if (
                    pods_selected(spec.get("podSelector"))
                    and "podSelector" in peer
                    and "namespaceSelector" not in peer
                ):
                    if not pods_selected(peer["podSelector"]):
                        errors.append(
                            f"NetworkPolicy/{name}: `from` podSelector {peer['podSelector']} matches "
                            "no pod template in the render"
                        )
            for c in selected:
                for p in rule.get("ports") or []:
                    if container_port(c, p.get("port")) != c.listen_port:
                        errors.append(
                            f"NetworkPolicy/{name}: port {p.get('port')} is not {c.binary.name}'s "
                            f"listen port {c.listen_port}"
                        )

    def effective(c: OurContainer) -> tuple[Binary, dict]:
        return c.binary, {**image_env.get(c.binary.name, {}), **c.config}

    check_message_limits(
        "render",
        [effective(c) for c in ours if c.binary.name == "secsync-gateway"],
        [effective(c) for c in ours if c.binary.name == "secsync-persistence"],
        errors,
    )
    return errors


def check_k8s_security(objects) -> list[str]:
    errors = []
    for obj, template in pod_templates(objects):
        pod = template.get("spec") or {}
        pod_sc = pod.get("securityContext") or {}
        for container in pod.get("containers") or []:
            if not image_binary(container.get("image")):
                continue
            sc = container.get("securityContext") or {}
            where = f"{obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
                errors.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                errors.append(f"{where}: runs as uid 0")
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                errors.append(f"{where}: capabilities do not drop ALL")
    return errors


def check_hpa_metric(component: Path, objects: list[dict]) -> list[str]:
    values = yaml.safe_load((component / "prometheus-adapter-values.yaml").read_text())
    exposed = set()
    for rule in (values.get("rules") or {}).get("custom") or []:
        name = rule.get("name") or {}
        if name.get("as"):
            exposed.add(name["as"])
        elif m := re.match(r"\s*([A-Za-z_:][\w:]*)", rule.get("seriesQuery", "")):
            exposed.add(m.group(1))
    used = set()
    for obj in objects:
        if obj["kind"] == "HorizontalPodAutoscaler":
            for metric in obj["spec"].get("metrics") or []:
                if metric["type"] == "Pods":
                    used.add(metric["pods"]["metric"]["name"])
    errors = []
    if not used:
        errors.append(f"{component.relative_to(ROOT)} adds no Pods metric to the HPA")
    for name in sorted(used - exposed):
        errors.append(
            f"the HPA scales on pods metric {name}, but prometheus-adapter-values.yaml exposes "
            f"{sorted(exposed) or 'nothing'}"
        )
    return errors


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_value(value: str) -> str:
    """${VAR:-default} -> default: what the stack runs with when VAR is unset."""

    def default(m: re.Match) -> str:
        body = m.group(1)
        for separator in (":-", "-"):
            if separator in body:
                return body.split(separator, 1)[1]
        return ""

    return re.sub(r"\$\{([^}]*)\}", default, value)


def check_compose(binaries, targets) -> list[str]:
    errors: list[str] = []
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose.get("services") or {}
    ours: dict[str, tuple[Binary, dict, int | None]] = {}
    image_envs = {target_binary(s): s.env for s in targets.values()}
    for name, svc in services.items():
        where = f"docker-compose.yml service {name}"
        for dep, cond in (
            svc.get("depends_on").items()
            if isinstance(svc.get("depends_on"), dict)
            else ((d, {}) for d in svc.get("depends_on") or [])
        ):
            if dep not in services:
                errors.append(f"{where}: depends_on {dep}, which is not a service")
            elif (cond or {}).get("condition") == "service_healthy" and not services[dep].get(
                "healthcheck"
            ):
                errors.append(
                    f"{where}: waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")) and not (ROOT / source).exists():
                errors.append(f"{where}: bind mount source {source} does not exist")
        build = svc.get("build")
        target = build.get("target") if isinstance(build, dict) else None
        binary_name = image_binary(svc.get("image"))
        if target:
            if target not in targets:
                errors.append(
                    f"{where}: build target {target} is not a Dockerfile target running a secsync binary"
                )
                continue
            if binary_name and binary_name != target_binary(targets[target]):
                errors.append(
                    f"{where}: image {svc['image']} but build target {target} runs {target_binary(targets[target])}"
                )
            binary_name = target_binary(targets[target])
        if not binary_name:
            continue
        binary = binaries[binary_name]
        image_env = next((s.env for s in targets.values() if target_binary(s) == binary_name), {})
        env = {k: compose_value(v) for k, v in compose_env(svc).items()}
        check_env_names(where, binary, env, errors)
        command = svc.get("command") or []
        if isinstance(command, str):
            command = shlex.split(command)
        env.update(check_flags(where, binary, command, errors))
        port = effective_listen(where, binary, env, image_env, errors)
        exposed = [int(str(p).split("/")[0]) for p in svc.get("expose") or []]
        for p in svc.get("ports") or []:
            spec = (
                str(p["target"]) if isinstance(p, dict) else str(p).split("/")[0].rsplit(":", 1)[-1]
            )
            exposed.append(int(spec))
        for p in exposed:
            if p != port:
                errors.append(
                    f"{where}: exposes port {p} but {binary.listen_env} listens on {port}"
                )
        health = svc.get("healthcheck") or {}
        if health and not health.get("disable"):
            errors.append(
                f"{where}: has a healthcheck, but the distroless image has no shell or tool to run it"
            )
        if binary.drains:
            drain = float(env.get("SECSYNC_DRAIN_SECONDS", binary.default("SECSYNC_DRAIN_SECONDS")))
            grace = duration_seconds(svc.get("stop_grace_period", "10s"))
            if grace is None or grace < drain:
                errors.append(
                    f"{where}: stop_grace_period {svc.get('stop_grace_period', '10s (default)')} is "
                    f"shorter than the drain deadline {drain:g} s"
                )
        ours[name] = (binary, env, port)

    for name, (binary, env, _) in ours.items():
        where = f"docker-compose.yml service {name}"
        if "SECSYNC_PERSISTENCE_URL" in env:
            parts = urlsplit(env["SECSYNC_PERSISTENCE_URL"])
            target = ours.get(parts.hostname or "")
            if not target or target[0].name != "secsync-persistence":
                errors.append(
                    f"{where}: SECSYNC_PERSISTENCE_URL host {parts.hostname} is not the persistence service"
                )
            elif parts.port != target[2]:
                errors.append(
                    f"{where}: SECSYNC_PERSISTENCE_URL port {parts.port} but persistence listens on {target[2]}"
                )
        elif binary.name == "secsync-gateway":
            errors.append(f"{where}: SECSYNC_PERSISTENCE_URL is not set (default is loopback)")
        for key in ("SECSYNC_NATS_URL",):
            if key in env and (urlsplit(env[key]).hostname or "") not in services:
                errors.append(f"{where}: {key} host {urlsplit(env[key]).hostname} is not a service")

    # The load balancer in front of the gateways.
    haproxy = ROOT / "deploy/haproxy/haproxy.cfg"
    servers, check_paths = [], []
    section = ""
    for raw in haproxy.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not raw.startswith((" ", "\t")):
            section = line
            continue
        if section.startswith("backend"):
            if m := re.match(r"server\s+\S+\s+([^:\s]+):(\d+)", line):
                servers.append((m.group(1), int(m.group(2))))
            if m := re.match(r"http-check\s+send\b.*\buri\s+(\S+)", line):
                check_paths.append(m.group(1))
            if m := re.match(r"option\s+httpchk\s+(?:\S+\s+)?(/\S*)", line):
                check_paths.append(m.group(1))
    gateways = {n for n, (b, _, _) in ours.items() if b.name in ("secsync-gateway", "secsync")}
    for host, port in servers:
        if host not in ours:
            errors.append(
                f"deploy/haproxy/haproxy.cfg: server {host}:{port} is not a secsync service of docker-compose.yml"
            )
        elif port != ours[host][2]:
            errors.append(
                f"deploy/haproxy/haproxy.cfg: server {host}:{port} but {host} listens on {ours[host][2]}"
            )
    for missing in sorted(gateways - {h for h, _ in servers}):
        errors.append(
            f"deploy/haproxy/haproxy.cfg: gateway service {missing} is not a server of the backend"
        )
    if not check_paths:
        errors.append("deploy/haproxy/haproxy.cfg: the backend has no HTTP health check")
    for path in check_paths:
        for host, _ in servers:
            if host in ours and path not in ours[host][0].health_paths:
                errors.append(
                    f"deploy/haproxy/haproxy.cfg: health check {path} is not a health path of {ours[host][0].name}"
                )
    check_message_limits(
        "docker-compose.yml",
        [
            (b, {**image_envs.get(b.name, {}), **e})
            for b, e, _ in ours.values()
            if b.name == "secsync-gateway"
        ],
        [
            (b, {**image_envs.get(b.name, {}), **e})
            for b, e, _ in ours.values()
            if b.name == "secsync-persistence"
        ],
        errors,
    )
    return errors


def check_compose_schema(check_jsonschema: str) -> list[str]:
    out = subprocess.run(
        [
            check_jsonschema,
            "--schemafile",
            str(ROOT / "deploy/schema/compose-spec.json"),
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode == 0:
        return []
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()] or [
        f"check-jsonschema exited with {out.returncode}"
    ]


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--kubernetes-validate", required=True)
    parser.add_argument("--check-jsonschema", required=True)
    parser.add_argument("--passed", type=int, default=0, help="checks already passed by the caller")
    opts = parser.parse_args()

    passed, failed = opts.passed, 0

    def report(name: str, errors: list[str], detail: str = "") -> None:
        nonlocal passed, failed
        if errors:
            failed += 1
            print(f"FAIL {name}")
            for error in errors:
                for line in str(error).splitlines():
                    print(f"       {line}")
        else:
            passed += 1
            print(f"ok   {name}{': ' + detail if detail else ''}")
        sys.stdout.flush()

    def run(name: str, fn, detail=""):
        try:
            errors = fn()
        except CheckError as e:
            errors = [str(e)]
        except Exception as e:  # a broken file must fail its check, not the whole script
            errors = [f"{type(e).__name__}: {e}"]
        report(name, errors, detail() if callable(detail) and not errors else "")
        return errors

    bin_dir = Path(opts.bin_dir)
    if not bin_dir.is_absolute():
        bin_dir = ROOT / bin_dir
    binaries: dict[str, Binary] = {}

    def load():
        binaries.update(load_binaries(bin_dir))
        return []

    run(
        "help: the binaries' flags, environment variables and health paths",
        load,
        lambda: ", ".join(f"{b.name} {len(b.env)} env vars" for b in binaries.values()),
    )

    def with_binaries(fn):
        # Without --help there is nothing to check drift against: those checks fail too.
        def checked():
            if not binaries:
                raise CheckError("needs the binaries' --help (see the help check)")
            return fn()

        return checked

    stages: list[Stage] = []
    try:
        _, stages = parse_dockerfile(ROOT / "Dockerfile")
    except Exception:
        pass
    targets = image_targets(stages)
    image_env = {target_binary(s): s.env for s in targets.values()}

    run(
        "dockerfile: toolchain pin, targets, ENV/EXPOSE/ENTRYPOINT, COPY sources",
        with_binaries(lambda: check_dockerfile(binaries)),
    )

    overlays = sorted(p.parent for p in (ROOT / "k8s/overlays").glob("*/kustomization.yaml"))
    components = sorted(p.parent for p in (ROOT / "k8s/components").glob("*/kustomization.yaml"))
    renders = []  # (label, render function, component or None)
    for overlay in overlays:
        renders.append(
            (str(overlay.relative_to(ROOT)), lambda o=overlay: render(opts.kubectl, o), None)
        )
        for component in components:
            renders.append(
                (
                    f"{overlay.relative_to(ROOT)} + {component.relative_to(ROOT / 'k8s')}",
                    lambda o=overlay, c=component: render_with_component(opts.kubectl, o, c),
                    component,
                )
            )
    if not overlays:
        report("k8s: overlays", ["no k8s/overlays/*/kustomization.yaml found"])
    for label, make, component in renders:
        objects: list[dict] = []

        def schema(make=make, objects=objects):
            objects.extend(make())
            return validate_schema(opts.kubernetes_validate, objects)

        run(
            f"k8s schema: {label}",
            schema,
            lambda objects=objects: f"{len(objects)} objects valid against Kubernetes "
            f"{K8S_VERSION.rsplit('.', 1)[0]} (strict)",
        )
        if not objects:
            report(f"k8s drift: {label}", ["not rendered"])
            report(f"k8s security: {label}", ["not rendered"])
            continue
        run(
            f"k8s drift: {label}",
            with_binaries(lambda objects=objects: check_k8s_drift(objects, binaries, image_env)),
        )
        run(f"k8s security: {label}", lambda objects=objects: check_k8s_security(objects))
        if component and (component / "prometheus-adapter-values.yaml").exists():
            run(
                f"hpa metric: {label}",
                lambda objects=objects, c=component: check_hpa_metric(c, objects),
            )

    run(
        "compose schema: docker-compose.yml against deploy/schema/compose-spec.json",
        lambda: check_compose_schema(opts.check_jsonschema),
    )
    run(
        "compose drift: docker-compose.yml, deploy/haproxy/haproxy.cfg",
        with_binaries(lambda: check_compose(binaries, targets)),
    )

    print(f"deploy-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
