#!/usr/bin/env bash
# The one test command (README.md): installs and starts what the tests need, then runs every check
# and every test. CI (.ci/run) calls exactly this. Safe to run repeatedly on a developer machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '\n==> %s\n' "$*"; }

# The vectors live beside the repo (../shared/vectors); the tests read them from there.
export SECSYNC_VECTORS_DIR="${SECSYNC_VECTORS_DIR:-$root/../shared/vectors}"
if [ ! -f "$SECSYNC_VECTORS_DIR/snapshots.json" ]; then
  echo "test vectors not found at $SECSYNC_VECTORS_DIR (expected ../shared/vectors)" >&2
  exit 1
fi

# One target directory and one profile for everything (tests and the binaries the end-to-end
# suite starts): this machine has 2 cores, building twice would double CI time.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
export CARGO_TERM_COLOR=never

source scripts/services.sh

ensure_postgres
ensure_nats
trap stop_started_services EXIT
export SECSYNC_TEST_DATABASE_URL="${SECSYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

log "rust toolchain"
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
cargo --version

log "format"
cargo fmt --all --check

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "build (release: the tests and the binaries the end-to-end suite starts)"
cargo build --workspace --release --locked --bins --tests

log "deployment files: Kubernetes overlays, compose file, drift against the binaries' flags"
tests/deploy-check.sh "$CARGO_TARGET_DIR/release"

log "unit, vector, property and integration tests"
cargo test --workspace --release --locked

log "starting the stack for the end-to-end tests"
if ! command -v node >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)

stack=$(mktemp -d "${TMPDIR:-/tmp}/secsync-stack.XXXXXX")
e2e_db="secsync_e2e_$$"
cleanup() {
  tests/stack.sh stop "$stack" || true
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $e2e_db WITH (FORCE)" >/dev/null 2>&1 || true
  stop_started_services
}
trap cleanup EXIT
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $e2e_db" >/dev/null
persistence=$(tests/stack.sh start-persistence "$stack" "postgres://postgres@127.0.0.1:5432/$e2e_db")
gw0=$(tests/stack.sh start-gateway "$stack" gw0 "$persistence")
gw1=$(tests/stack.sh start-gateway "$stack" gw1 "$persistence")
restart0="'$root/tests/stack.sh' restart-gateway '$stack' gw0"
# Two more gateways in jwt mode (an HS256 secret): the two-gateway target runs against them, the
# harness minting a token per client, so open and jwt mode are both covered by the suite.
head -c 32 /dev/urandom | base64 >"$stack/jwt-secret"
jwt0=$(SECSYNC_STACK_JWT_KEY_FILE="$stack/jwt-secret" tests/stack.sh start-gateway "$stack" jwt0 "$persistence")
jwt1=$(SECSYNC_STACK_JWT_KEY_FILE="$stack/jwt-secret" tests/stack.sh start-gateway "$stack" jwt1 "$persistence")
restart_jwt0="'$root/tests/stack.sh' restart-gateway '$stack' jwt0"
# The embedded single-process binary, on SQLite in a fresh data directory.
embedded=$(tests/stack.sh start-embedded "$stack" embedded "$stack/embedded-data")
restart_embedded="'$root/tests/stack.sh' restart-gateway '$stack' embedded"

passed=0
failed=0
run_suite() {
  local label=$1 endpoints=$2 restart=$3 jwt_secret=${4:-} out
  echo "-- target: $label"
  out=$(mktemp)
  SECSYNC_E2E_ENDPOINTS="$endpoints" SECSYNC_E2E_RESTART_CMD_0="$restart" SECSYNC_E2E_FAIL_ON_SKIP=1 SECSYNC_E2E_RUST_PEER="$root/target/release/secsync-yrs-peer" \
    SECSYNC_E2E_JWT_SECRET_FILE="$jwt_secret" node tests/e2e/run.mjs 2>"$out.err" | tee "$out" || true
  local line
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -1)
  if [ -z "$line" ]; then
    echo "the suite did not finish ($label); its stderr:" >&2
    tail -50 "$out.err" >&2
    failed=$((failed + 1))
    return
  fi
  passed=$((passed + ${line%% passed*}))
  local f=${line##*, }
  failed=$((failed + ${f%% failed}))
  if [ "${f%% failed}" != 0 ]; then tail -80 "$out.err" >&2; fi
}
log "Rust client against the gateway"
SECSYNC_CLIENT_TEST_ENDPOINT="$gw1" cargo test -p secsync-client --release --locked --test reference -- --ignored

log "end-to-end suite with the published JavaScript client"
run_suite "persistence + one gateway" "$gw0" "$restart0"
run_suite "persistence + two gateways, --auth jwt" "$jwt0,$jwt1" "$restart_jwt0" "$stack/jwt-secret"
run_suite "embedded single process (SQLite)" "$embedded" "$restart_embedded"

echo "e2e: $passed passed, $failed failed"
[ "$failed" = 0 ]
