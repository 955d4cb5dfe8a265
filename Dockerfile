# syntax=docker/dockerfile:1.7
#
# Container images of the secsync relay: ONE build stage compiles the three release binaries in
# one cargo invocation; each runtime image (a target of this file) carries exactly one of them.
#
#   docker build --target gateway     -t secsync-gateway .      # WebSocket gateway
#   docker build --target persistence -t secsync-persistence .  # gRPC persistence over Postgres
#   docker build --target secsync     -t secsync .              # embedded single-process relay
#                                                               # (also the default target)
#
# BuildKit builds the `builder` stage once and shares it between the targets (docker compose
# builds all of them from the same cache). The runtime base is distroless/cc: glibc, libgcc_s,
# CA certificates and a non-root user (65532), no shell and no package manager. The binaries
# link only libc, libm and libgcc_s, so the builder uses the same Debian release (bookworm,
# glibc 2.36) as the runtime. tests/deploy-check.sh checks RUST_VERSION against
# rust-toolchain.toml and every ENV/EXPOSE below against the binaries' --help.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# CARGO_PROFILE_RELEASE_STRIP: keep symbols (panics and backtraces still name functions) but not
# the line tables of the workspace's release profile: about 10 MiB per binary instead of 55-80 MiB.
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
# Only what the build reads (.dockerignore keeps everything else out of the context).
COPY rust-toolchain.toml Cargo.toml Cargo.lock ./
COPY proto ./proto
COPY services ./services
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bins -p secsync-gateway -p secsync-persistence -p secsync \
 && mkdir -p /out/bin /out/data \
 && cp target/release/secsync-gateway target/release/secsync-persistence target/release/secsync /out/bin/

# ---------------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.vendor="secsync relay" \
      org.opencontainers.image.licenses="MIT"
USER 65532:65532
WORKDIR /home/nonroot

# ---------------------------------------------------------------------------------------------
FROM runtime AS persistence
LABEL org.opencontainers.image.title="secsync-persistence" \
      org.opencontainers.image.description="secsync persistence service: gRPC (with grpc.health.v1) over PostgreSQL; runs its migrations on start"
COPY --from=builder /out/bin/secsync-persistence /usr/local/bin/secsync-persistence
# Listen on every interface inside the container (the binary's default is loopback).
ENV SECSYNC_PERSISTENCE_LISTEN=0.0.0.0:50051 \
    SECSYNC_LOG_FORMAT=json
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/secsync-persistence"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS gateway
LABEL org.opencontainers.image.title="secsync-gateway" \
      org.opencontainers.image.description="secsync WebSocket gateway: /healthz, /readyz; drains on SIGTERM (connections closed with 1012)"
COPY --from=builder /out/bin/secsync-gateway /usr/local/bin/secsync-gateway
ENV SECSYNC_GATEWAY_LISTEN=0.0.0.0:4000 \
    SECSYNC_LOG_FORMAT=json
EXPOSE 4000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/secsync-gateway"]

# ---------------------------------------------------------------------------------------------
# Last stage = the default target: the whole relay in one process, SQLite under /data.
FROM runtime AS secsync
LABEL org.opencontainers.image.title="secsync" \
      org.opencontainers.image.description="secsync relay in one process (SQLite under /data, or PostgreSQL with SECSYNC_DATABASE_URL)"
COPY --from=builder /out/bin/secsync /usr/local/bin/secsync
COPY --from=builder --chown=65532:65532 /out/data /data
ENV SECSYNC_LISTEN=0.0.0.0:4000 \
    SECSYNC_DATA_DIR=/data \
    SECSYNC_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 4000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/secsync"]
