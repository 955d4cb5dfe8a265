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

log "rust toolchain"
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
cargo --version

log "format"
cargo fmt --all --check

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "unit, vector, property and integration tests"
cargo test --workspace --release --locked
