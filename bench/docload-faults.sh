#!/usr/bin/env bash
# CPU time and page faults per 10,000-update document load, per process, on persistence + one
# gateway (BENCHMARKS.md, "Allocator"). Each docload run writes a fresh document and loads it
# N times in each mode; the difference between a run of 220 and one of 20 loads, divided by 200,
# leaves the loads alone. Needs the release binaries (or SECSYNC_BIN_DIR) and PostgreSQL at
# 127.0.0.1:5432; LD_PRELOAD_SERVERS=/path/lib.so starts both servers with that preload.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
db=docload_faults_$$
dir=$(mktemp -d)
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db"
cleanup() {
  tests/stack.sh stop "$dir" || true
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db" || true
  rm -rf "$dir"
}
trap cleanup EXIT
preload=${LD_PRELOAD_SERVERS:-}
p=$(LD_PRELOAD=$preload tests/stack.sh start-persistence "$dir" "postgres://postgres@127.0.0.1:5432/$db")
g=$(LD_PRELOAD=$preload SECSYNC_RATE_PER_SECOND=1000000 tests/stack.sh start-gateway "$dir" a "$p")
gp=$(cat "$dir/a.pid")
pp=$(cat "$dir/persistence.pid")
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in clock ticks
faults() { awk '{print $10}' "/proc/$1/stat"; }    # minor faults
tick=$(getconf CLK_TCK)
run() {
  "${SECSYNC_BIN_DIR:-target/release}/secsync-bench" run --url "$g" --phases docload \
    --docload-sizes 10000 --docload-repeats "$1" 2>/dev/null | grep 'complete' | head -1
}
measure() {
  local g0 p0 gf0 pf0
  g0=$(cpu "$gp"); p0=$(cpu "$pp"); gf0=$(faults "$gp"); pf0=$(faults "$pp")
  run "$1" >"$dir/last-run"
  echo "$(( $(cpu "$gp") - g0 )) $(( $(cpu "$pp") - p0 )) $(( $(faults "$gp") - gf0 )) $(( $(faults "$pp") - pf0 ))"
}
run 5 >/dev/null
read -r g20 p20 gf20 pf20 < <(measure 20)
read -r g220 p220 gf220 pf220 < <(measure 220)
echo "last run: $(cat "$dir/last-run")"
echo "per load (200 complete + 200 delta loads):"
echo "  gateway:     CPU $(( (g220 - g20) * 1000 / tick / 200 )) ms, $(( (gf220 - gf20) / 200 )) page faults"
echo "  persistence: CPU $(( (p220 - p20) * 1000 / tick / 200 )) ms, $(( (pf220 - pf20) / 200 )) page faults"
