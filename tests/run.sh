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

# PostgreSQL on 127.0.0.1:5432 with trust auth for the local test user: started if it is not
# running, installed from Debian's packages if it is absent.
ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
    sed -i 's/^\(host.*127.0.0.1\/32\s*\)\S*$/\1trust/; s/^\(local\s*all\s*all\s*\)\S*$/\1trust/' "$hba"
  fi
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return
    sleep 0.5 # polling a server we just started; there is no event to wait on
  done
  echo "PostgreSQL did not become ready" >&2
  exit 1
}
ensure_postgres
export SECSYNC_TEST_DATABASE_URL="${SECSYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

log "rust toolchain"
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
cargo --version

log "format"
cargo fmt --all --check

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "unit, vector, property and integration tests"
cargo test --workspace --release --locked
