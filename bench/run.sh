#!/usr/bin/env bash
# One command for issue 10's comparison: the baseline (published secsync-server 0.5 with the
# example backend's store, in memory and on PostgreSQL) and ours (persistence + two gateways on
# NATS, and the embedded single binary), back to back on this machine with the same phase
# parameters, then a table of every metric with the ratio to the baseline, a JSON summary and
# a plot of latency against offered load.
#
#   bench/run.sh                       everything (about 10 minutes on 2 cores)
#   TARGETS="ours-embedded" PHASES=throughput,fanout bench/run.sh
#
# Everything runs on loopback and free ports. PostgreSQL at 127.0.0.1:5432 (user postgres, trust
# auth) and NATS at 127.0.0.1:4222 are used when running, else started (and stopped at the end)
# by scripts/services.sh. Private databases are created and dropped. Results go to
# bench/results/<time>/ (git-ignored): results.jsonl (one JSON line per phase and target),
# summary.json, table.md, latency-vs-load.png, bench.log, meta.txt. PUBLISH=1 also copies the
# plot to bench/latency-vs-load.png, the place BENCHMARKS.md shows it from.
#
# Parameters (environment, defaults in brackets):
#   TARGETS [baseline-mem baseline-pg ours-2gw ours-embedded]   PHASES [throughput,fanout,docload,idle]
#   CLIENTS [64] DOCS [16] WINDOWS [1 8] RUN_SECONDS [10] WARMUP [1]     unpaced throughput, per window
#   RATES [250 500 1000 2000 3000 4000 5000 6000 8000 10000] ("" = no sweep) SWEEP_WINDOW [8] SWEEP_SECONDS [5]
#                                     paced throughput for the plot; a target's sweep stops after
#                                     the first rate it cannot keep up with (acked < 90 % offered)
#   HALF_PEAK_RUNS [3] HALF_PEAK_SECONDS [10]   after the unpaced window-1 run, paced runs (window
#                                     SWEEP_WINDOW) at half the rate it reached: issue 10's latency
#                                     goal, repeated because one run's p99 varies; their lines go to
#                                     half-peak.jsonl, each target's p99s and median to half-peak.json;
#                                     for the targets on PostgreSQL, pgbench commits one-row inserts
#                                     into a database of its own at 100/s meanwhile (if installed):
#                                     the slowest commit of each run shows when PostgreSQL itself
#                                     stalled (half-peak-probe.jsonl)
#   FANOUT_RECEIVERS [20] FANOUT_UPDATES [2000]
#   DOCLOAD_SIZES [1000,10000] DOCLOAD_REPEATS [30]
#   IDLE_STEPS [5000,10000,15000]
#   SKIP_BUILD=1 (use the binaries in target/release)   SKIP_NPM=1 (node_modules as they are)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
TARGETS=${TARGETS:-"baseline-mem baseline-pg ours-2gw ours-embedded"}
PHASES=${PHASES:-throughput,fanout,docload,idle}
CLIENTS=${CLIENTS:-64}
DOCS=${DOCS:-16}
WINDOWS=${WINDOWS:-"1 8"}
RUN_SECONDS=${RUN_SECONDS:-10}
WARMUP=${WARMUP:-1}
RATES=${RATES-"250 500 1000 2000 3000 4000 5000 6000 8000 10000"}
SWEEP_WINDOW=${SWEEP_WINDOW:-8}
SWEEP_SECONDS=${SWEEP_SECONDS:-5}
HALF_PEAK_RUNS=${HALF_PEAK_RUNS:-3}
HALF_PEAK_SECONDS=${HALF_PEAK_SECONDS:-10}
FANOUT_RECEIVERS=${FANOUT_RECEIVERS:-20}
FANOUT_UPDATES=${FANOUT_UPDATES:-2000}
DOCLOAD_SIZES=${DOCLOAD_SIZES:-1000,10000}
DOCLOAD_REPEATS=${DOCLOAD_REPEATS:-30}
IDLE_STEPS=${IDLE_STEPS:-5000,10000,15000}

out=${BENCH_OUT:-$root/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
results=$out/results.jsonl
bench=$root/target/release/secsync-bench
log() { echo "[bench $(date -u +%H:%M:%S)] $*" | tee -a "$out/bench.log" >&2; }
has_phase() { [[ ",$PHASES," == *",$1,"* ]]; }

# The per-connection rate limit (500 frames/s by default) is a policy, not capacity; the
# reference has none. Every relay of ours runs without it here.
export SECSYNC_RATE_PER_SECOND=1000000 SECSYNC_RATE_BURST=1000000

# shellcheck source=../scripts/services.sh
. "$root/scripts/services.sh"
ensure_postgres
ensure_nats

pg_admin() { psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres -d postgres "$@"; }
base_db=secsync_bench_base_$$
ours_db=secsync_bench_ours_$$
probe_db=secsync_bench_probe_$$
running=()  # "kind:handle" of what must be stopped

cleanup() {
  set +e
  for r in "${running[@]}"; do stop_one "$r"; done
  pg_admin -c "DROP DATABASE IF EXISTS $base_db" 2>/dev/null
  pg_admin -c "DROP DATABASE IF EXISTS $ours_db" 2>/dev/null
  pg_admin -c "DROP DATABASE IF EXISTS $probe_db" 2>/dev/null
  stop_started_services
}
trap cleanup EXIT

stop_one() {
  case "$1" in
    ref:*) bench/reference/refctl.sh stop "${1#ref:}" ;;
    pid:*)
      local pid=${1#pid:}
      kill "$pid" 2>/dev/null || return 0
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null
      ;;
    stack:*) tests/stack.sh stop "${1#stack:}" ;;
  esac
}
stop_all() {
  for r in "${running[@]}"; do stop_one "$r"; done
  running=()
}

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building (release): secsync-bench, secsync, secsync-gateway, secsync-persistence"
  cargo build --release --bin secsync-bench --bin secsync --bin secsync-gateway --bin secsync-persistence
fi
if [ -z "${SKIP_NPM:-}" ]; then
  log "npm ci in bench/reference and bench/baseline"
  (cd bench/reference && npm ci --no-audit --no-fund --loglevel=error)
  (cd bench/baseline && npm ci --no-audit --no-fund --loglevel=error)
fi

pg_admin -c "CREATE DATABASE $base_db"
pg_admin -c "CREATE DATABASE $ours_db"
probe=""
if command -v pgbench >/dev/null 2>&1; then
  pg_admin -c "CREATE DATABASE $probe_db"
  psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d "$probe_db" \
    -c "CREATE TABLE probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
  echo "INSERT INTO probe DEFAULT VALUES;" >"$out/probe.sql"
  probe=1
fi
psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d "$base_db" -f bench/baseline/schema.sql

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD) ($(git status --porcelain -- services | wc -l) changed files under services/ in the work tree)"
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "node: $(node --version); postgres: $(psql -At -h 127.0.0.1 -U postgres -c 'SHOW server_version')"
  echo "parameters: clients=$CLIENTS docs=$DOCS windows=[$WINDOWS] seconds=$RUN_SECONDS rates=[$RATES] sweep_window=$SWEEP_WINDOW fanout=$FANOUT_RECEIVERS x $FANOUT_UPDATES docload=$DOCLOAD_SIZES x $DOCLOAD_REPEATS idle=$IDLE_STEPS"
} >"$out/meta.txt"
cat "$out/meta.txt" >&2

# Starts TARGET; sets URLS (array), PID (the process whose memory the idle phase reads) and
# WATCH (the bench's --watch/--watch-comm arguments: whose CPU time each phase reports).
start_target() {
  local target=$1 dir=$out/$1 url
  rm -rf "$dir"
  mkdir -p "$dir"
  case "$target" in
    baseline-mem)
      url=$(bench/reference/refctl.sh start "$dir/ref")
      running+=("ref:$dir/ref")
      URLS=("$url")
      PID=$(cat "$dir/ref/pid")
      WATCH=(--watch "node=$PID")
      ;;
    baseline-pg)
      DATABASE_URL=postgres://postgres@127.0.0.1:5432/$base_db PORT=0 \
        nohup node bench/baseline/server.mjs >"$dir/ready" 2>"$dir/server.log" </dev/null &
      PID=$!
      running+=("pid:$PID")
      for _ in $(seq 1 200); do
        grep -q "^listening " "$dir/ready" 2>/dev/null && break
        kill -0 "$PID" 2>/dev/null || { echo "baseline-pg exited; see $dir/server.log" >&2; return 1; }
        sleep 0.05
      done
      URLS=("$(sed -n 's/^listening //p' "$dir/ready")")
      WATCH=(--watch "node=$PID" --watch-comm postgres)
      ;;
    ours-2gw)
      local persistence a b
      persistence=$(tests/stack.sh start-persistence "$dir" "postgres://postgres@127.0.0.1:5432/$ours_db")
      running+=("stack:$dir")
      a=$(tests/stack.sh start-gateway "$dir" a "$persistence")
      b=$(tests/stack.sh start-gateway "$dir" b "$persistence")
      URLS=("$a" "$b")
      PID=$(cat "$dir/a.pid")
      WATCH=(--watch "gateway-a=$PID" --watch "gateway-b=$(cat "$dir/b.pid")"
        --watch "persistence=$(cat "$dir/persistence.pid")" --watch-comm postgres --watch-comm nats-server)
      ;;
    ours-embedded)
      URLS=("$(tests/stack.sh start-embedded "$dir" emb "$dir/data")")
      running+=("stack:$dir")
      PID=$(cat "$dir/emb.pid")
      WATCH=(--watch "secsync=$PID")
      ;;
    *) echo "unknown target $target" >&2; return 2 ;;
  esac
}

# HALF_PEAK_RUNS paced runs at half of $label's peak, each with the PostgreSQL commit probe.
half_peak_runs() {
  half=$(half_of_peak)
  if [ -n "$half" ] && [ "$HALF_PEAK_RUNS" -gt 0 ]; then
    for i in $(seq 1 "$HALF_PEAK_RUNS"); do
      log "$target: half of peak, $half updates/s offered (run $i of $HALF_PEAK_RUNS)"
      probe_pid=""
      if [ -n "$probe" ] && [[ $target == *pg* || $target == ours-2gw ]]; then
        rm -f "$out"/probe-log.*
        pgbench -h 127.0.0.1 -U postgres -n -f "$out/probe.sql" -R 100 \
          -T $((HALF_PEAK_SECONDS + WARMUP + 1)) -l --log-prefix="$out/probe-log" "$probe_db" \
          >>"$out/probe.out" 2>&1 &
        probe_pid=$!
      fi
      json_out=$out/half-peak.jsonl run_bench "${urlargs[@]}" --phases throughput --clients "$CLIENTS" \
        --docs "$DOCS" --window "$SWEEP_WINDOW" --seconds "$HALF_PEAK_SECONDS" --warmup-seconds "$WARMUP" \
        --rate "$half"
      if [ -n "$probe_pid" ]; then
        wait "$probe_pid" || true
        # pgbench's log: client, transaction, latency (µs), script, epoch s, µs, schedule lag (µs).
        awk -v label="$label" -v run="$i" '{ n++; if ($3 > max) max = $3; if ($3 > 15000) slow++ }
          END { printf "{\"label\":\"%s\",\"run\":%d,\"commits\":%d,\"max_ms\":%.1f,\"over_15_ms\":%d}\n", label, run, n, max / 1000, slow }' \
          "$out"/probe-log.* >>"$out/half-peak-probe.jsonl" || true
      fi
    done
  fi
}

url_args() { for u in "$@"; do printf -- '--url\n%s\n' "$u"; done; }

status=0
run_bench() {
  # A failed phase is recorded (ok:false in its JSON line) and the run goes on.
  "$bench" run --label "$label" --json-out "${json_out:-$results}" --no-progress "${WATCH[@]}" "$@" \
    2>>"$out/bench.log" | tee -a "$out/bench.log" | grep -v '^{' || status=1
}

# The rate of the last unpaced window-1 run of $label, halved (empty if there is none).
half_of_peak() {
  python3 - "$results" "$label" <<'PY' 2>/dev/null || true
import json, sys
peak = None
for line in open(sys.argv[1]):
    v = json.loads(line)
    if (v["label"], v["phase"], v.get("window"), v.get("offered_rate")) == (sys.argv[2], "throughput", 1, None):
        peak = v["updates_per_second"]
if peak:
    print(round(peak / 2))
PY
}

for target in $TARGETS; do
  label=$target
  if has_phase throughput || has_phase fanout || has_phase docload; then
    log "$target: starting (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    start_target "$target"
    mapfile -t urlargs < <(url_args "${URLS[@]}")
    if has_phase throughput; then
      for w in $WINDOWS; do
        log "$target: throughput, window $w"
        run_bench "${urlargs[@]}" --phases throughput --clients "$CLIENTS" --docs "$DOCS" \
          --window "$w" --seconds "$RUN_SECONDS" --warmup-seconds "$WARMUP"
        # Right after the peak they halve: a saturating run with a larger window leaves
        # PostgreSQL writing back what it wrote for a while, which is that run's aftermath.
        if [ "$w" = 1 ]; then half_peak_runs; fi
      done
      for rate in $RATES; do
        log "$target: throughput at $rate updates/s offered"
        run_bench "${urlargs[@]}" --phases throughput --clients "$CLIENTS" --docs "$DOCS" \
          --window "$SWEEP_WINDOW" --seconds "$SWEEP_SECONDS" --warmup-seconds "$WARMUP" --rate "$rate"
        last=$(grep "\"label\":\"$label\"" "$results" | grep '"phase":"throughput"' | tail -1)
        if ! python3 -c 'import json, sys; v = json.loads(sys.argv[1]); sys.exit(0 if v["ok"] and v["updates_per_second"] >= 0.9 * float(sys.argv[2]) else 1)' "$last" "$rate"; then
          log "$target: saturated at $rate updates/s offered; sweep ends"
          break
        fi
      done
    fi
    if has_phase fanout; then
      log "$target: fanout"
      run_bench "${urlargs[@]}" --phases fanout --fanout-receivers "$FANOUT_RECEIVERS" \
        --fanout-updates "$FANOUT_UPDATES"
    fi
    if has_phase docload; then
      log "$target: docload"
      # --upload-window 1: writing the documents is not measured, and the reference handles a
      # connection's frames concurrently (PROTOCOL.md 8), so pipelined writes only add retries.
      run_bench "${urlargs[@]}" --phases docload --docload-sizes "$DOCLOAD_SIZES" \
        --docload-repeats "$DOCLOAD_REPEATS" --upload-window 1
    fi
    stop_all
  fi
  if has_phase idle; then
    # A fresh process, so the memory of the runs above does not blur the slope.
    log "$target: idle (fresh server; load average $(cut -d' ' -f1-3 /proc/loadavg))"
    start_target "$target"
    # Idle connections go to one process (gateway a for ours-2gw), whose memory is read.
    run_bench --url "${URLS[0]}" --phases idle --idle-steps "$IDLE_STEPS" --server-pid "$PID"
    stop_all
  fi
done

baselines=()
for b in baseline-pg baseline-mem; do
  grep -q "\"label\":\"$b\"" "$results" 2>/dev/null && baselines+=(--baseline "$b")
done
if [ ${#baselines[@]} -gt 0 ]; then
  "$bench" compare --input "$results" "${baselines[@]}" --json-out "$out/summary.json" | tee "$out/table.md"
fi
if [ -s "$out/half-peak.jsonl" ]; then
  python3 - "$out/half-peak.jsonl" "$out/half-peak.json" "$out/half-peak-probe.jsonl" <<'PY' | tee -a "$out/table.md"
import json, statistics, sys
runs, probes = {}, {}
for line in open(sys.argv[1]):
    v = json.loads(line)
    runs.setdefault(v["label"], []).append(v)
try:
    for line in open(sys.argv[3]):
        v = json.loads(line)
        probes.setdefault(v["label"], []).append(v)
except FileNotFoundError:
    pass
summary = {}
for label, vs in runs.items():
    p99 = [v["ack_ms"]["p99"] for v in vs]
    summary[label] = {
        "offered_rate": vs[-1]["offered_rate"],
        "ok": all(v["ok"] for v in vs),
        "ack_p50_ms": [v["ack_ms"]["p50"] for v in vs],
        "ack_p99_ms": p99,
        "ack_p99_median_ms": statistics.median(p99),
    }
    line = (f"half of peak, {label}: {vs[-1]['offered_rate']:.0f} updates/s offered, ack p99 "
            + ", ".join(f"{x:.2f}" for x in p99) + f" ms (median {statistics.median(p99):.2f})")
    if label in probes:
        slowest = [p["max_ms"] for p in probes[label]]
        summary[label]["probe_commit_max_ms"] = slowest
        line += "; slowest probe commit per run " + ", ".join(f"{x:.1f}" for x in slowest) + " ms"
    print(line)
json.dump(summary, open(sys.argv[2], "w"), indent=1, sort_keys=True)
PY
fi
if grep -q '"offered_rate":[0-9]' "$results" 2>/dev/null; then
  "$bench" plot --input "$results" --output "$out/latency-vs-load.png" \
    --title "secsync relay on 2 shared cores: ack latency against offered load ($CLIENTS clients, $DOCS documents)"
  if [ -n "${PUBLISH:-}" ]; then cp "$out/latency-vs-load.png" bench/latency-vs-load.png; fi
fi
log "results in $out"
exit $status
