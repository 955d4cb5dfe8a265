#!/usr/bin/env bash
# Offline checks of the deployment files (Dockerfile, docker-compose.yml, deploy/, k8s/), with
# no Docker engine and no cluster:
#   - every kustomize overlay (alone and with every component) renders with `kubectl kustomize`
#     and validates strictly against the Kubernetes 1.31 schemas (kubernetes-validate --strict);
#   - docker-compose.yml validates against the Compose specification schema in deploy/schema;
#   - drift: every environment variable, flag, port and health path that the manifests, the
#     compose file, the HAProxy config and the Dockerfile use for the secsync binaries is one the
#     binaries accept, read from their --help.
# deploy/check/deploy_check.py lists every rule. Prints one line per check and ends with
# `deploy-check: N passed, M failed`; exits non-zero if any check failed.
#
# Usage: tests/deploy-check.sh [BIN_DIR]   (the built binaries; default $SECSYNC_BIN_DIR, else
#        ${CARGO_TARGET_DIR:-target}/release, i.e.
#        after `cargo build --release --bins -p secsync-gateway -p secsync-persistence -p secsync`)
#
# Installs kubernetes-validate and check-jsonschema from PyPI into .venv-deploy/ (inside the
# repository, git-ignored); the Kubernetes schemas ship inside the kubernetes-validate package,
# so nothing else is fetched. kubectl comes from the machine (Debian's package where available).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin_dir=${1:-${SECSYNC_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}}

venv="$root/.venv-deploy"
requirements="kubernetes-validate==1.37.0 check-jsonschema==0.39.0"

setup_fail() {
  echo "FAIL tools: $*"
  echo "deploy-check: 0 passed, 1 failed"
  exit 1
}

# kubectl renders kustomize (kubectl kustomize).
kubectl=$(command -v kubectl || true)
if [ -z "$kubectl" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if apt-cache show kubectl >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-cache show kubectl >/dev/null 2>&1; }; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 || true
  fi
  kubectl=$(command -v kubectl || true)
fi
[ -n "$kubectl" ] || setup_fail "kubectl not found and no Debian package 'kubectl' available: install kubectl (it renders the kustomize overlays)"

# The Python tools, in a virtualenv inside the repository.
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || setup_fail "python3 not found"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv" >/dev/null 2>&1 || setup_fail "cannot create a virtualenv with $python -m venv (Debian: apt-get install python3-venv)"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --disable-pip-version-check -q $requirements >"$venv/pip.log" 2>&1 ||
    setup_fail "pip install $requirements failed (see $venv/pip.log)"
  echo "$requirements" >"$venv/.requirements"
fi

echo "ok   tools: $("$kubectl" version --client 2>/dev/null | head -1), kubernetes-validate $("$venv/bin/kubernetes-validate" --version), check-jsonschema $("$venv/bin/check-jsonschema" --version 2>/dev/null | awk '{print $NF}')"

exec "$venv/bin/python" deploy/check/deploy_check.py \
  --bin-dir "$bin_dir" \
  --kubectl "$kubectl" \
  --kubernetes-validate "$venv/bin/kubernetes-validate" \
  --check-jsonschema "$venv/bin/check-jsonschema" \
  --passed 1
