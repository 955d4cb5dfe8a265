#!/usr/bin/env bash
# Runs the relay locally: PostgreSQL and NATS (started or installed when needed), the persistence
# service and one gateway on ws://127.0.0.1:${SECSYNC_PORT:-4000}. Stops what it started on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '==> %s\n' "$*"; }
source scripts/services.sh
ensure_postgres
ensure_nats

log "building (release)"
cargo build --release --locked --bin secsync-persistence --bin secsync-gateway

db=${SECSYNC_DATABASE:-secsync}
psql -q -h 127.0.0.1 -U postgres -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
  || psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db"
stack=$(mktemp -d "${TMPDIR:-/tmp}/secsync-local.XXXXXX")
stop() {
  tests/stack.sh stop "$stack" || true
  stop_started_services
}
trap stop EXIT INT TERM
persistence=$(tests/stack.sh start-persistence "$stack" "postgres://postgres@127.0.0.1:5432/$db")
gateway=$(tests/stack.sh start-gateway "$stack" gateway "$persistence" "${SECSYNC_PORT:-4000}")
log "secsync relay ready: give the JavaScript client websocketEndpoint \"$gateway\" (logs in $stack)"
# Wait for the gateway to exit (or Ctrl-C).
while kill -0 "$(cat "$stack/gateway.pid")" 2>/dev/null; do sleep 1; done
