#!/usr/bin/env bash
# Starts and stops a local secsync stack (persistence service, gateways) on free loopback ports,
# for the end-to-end suite and for trying things by hand. Each process keeps its pid, port and
# log in DIR. Binaries come from $SECSYNC_BIN_DIR (default: target/release).
#
#   tests/stack.sh start-persistence DIR DATABASE_URL          prints http://127.0.0.1:PORT
#   tests/stack.sh start-gateway DIR NAME PERSISTENCE_URL [PORT]  prints ws://127.0.0.1:PORT
#   tests/stack.sh start-embedded DIR NAME DATA_DIR [PORT]     the single-process `secsync`; prints ws://…
#   tests/stack.sh restart-gateway DIR NAME                     SIGTERM, wait, start on the same port
#                                                               (a gateway or an embedded process)
#   tests/stack.sh stop DIR                                     stops everything started in DIR
#
# With SECSYNC_STACK_JWT_KEY_FILE set, start-gateway starts the gateway with `--auth jwt
# --jwt-key-file` that file (kept across restart-gateway); otherwise with `--auth open`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${SECSYNC_BIN_DIR:-$root/target/release}
cmd=${1:?usage: stack.sh start-persistence|start-gateway|restart-gateway|stop DIR ...}
dir=${2:?DIR required}
mkdir -p "$dir"

# Waits for a process's JSON log to report its listening address; prints the port.
wait_for_port() {
  local log=$1 pid=$2
  for _ in $(seq 1 400); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "process $pid exited during start-up; see $log" >&2
      return 1
    fi
    local port
    port=$(grep -o '"listen":"127\.0\.0\.1:[0-9]*"' "$log" 2>/dev/null | head -1 | grep -o '[0-9]*"$' | tr -d '"' || true)
    if [ -n "$port" ]; then
      echo "$port"
      return 0
    fi
    sleep 0.05 # polling a log file: there is no event to wait on from a shell
  done
  echo "no listening address in $log after 20 s" >&2
  return 1
}

wait_ready() {
  local port=$1
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "gateway on port $port not ready after 30 s" >&2
  return 1
}

stop_pid() {
  local pidfile=$1
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 1 600); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# Starts relay process NAME (the command follows), waits until it listens and is ready, prints
# its ws:// URL.
launch() {
  local name=$1
  shift
  SECSYNC_LOG_FORMAT=json RUST_LOG=${RUST_LOG:-info} nohup "$@" >>"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
  local bound
  bound=$(wait_for_port "$dir/$name.log" "$(cat "$dir/$name.pid")")
  echo "$bound" >"$dir/$name.port"
  wait_ready "$bound"
  echo "ws://127.0.0.1:$bound"
}

start_gateway() {
  local name=$1 persistence=$2 port=$3 auth=(--auth open)
  echo "$persistence" >"$dir/$name.persistence"
  if [ -f "$dir/$name.jwt" ]; then
    auth=(--auth jwt --jwt-key-file "$(cat "$dir/$name.jwt")")
  fi
  launch "$name" "$bin/secsync-gateway" --listen "127.0.0.1:$port" --persistence "$persistence" \
    --nats "${SECSYNC_NATS_URL:-nats://127.0.0.1:4222}" "${auth[@]}" --drain-seconds 10
}

start_embedded() {
  local name=$1 data=$2 port=$3
  echo "embedded $data" >"$dir/$name.persistence"
  launch "$name" "$bin/secsync" --listen "127.0.0.1:$port" --data-dir "$data" --drain-seconds 10
}

# Starts NAME again the way it was started first.
start_again() {
  local name=$1 port=$2 upstream
  upstream=$(cat "$dir/$name.persistence")
  case "$upstream" in
    "embedded "*) start_embedded "$name" "${upstream#embedded }" "$port" ;;
    *) start_gateway "$name" "$upstream" "$port" ;;
  esac
}

case "$cmd" in
  start-embedded)
    name=${3:?NAME required}
    : >"$dir/$name.log"
    start_embedded "$name" "${4:?DATA_DIR required}" "${5:-0}"
    ;;
  start-persistence)
    url=${3:?DATABASE_URL required}
    : >"$dir/persistence.log"
    DATABASE_URL=$url SECSYNC_LOG_FORMAT=json RUST_LOG=${RUST_LOG:-info} nohup "$bin/secsync-persistence" \
      --listen 127.0.0.1:0 >>"$dir/persistence.log" 2>&1 </dev/null &
    echo $! >"$dir/persistence.pid"
    port=$(wait_for_port "$dir/persistence.log" "$(cat "$dir/persistence.pid")")
    echo "http://127.0.0.1:$port"
    ;;
  start-gateway)
    name=${3:?NAME required}
    : >"$dir/$name.log"
    rm -f "$dir/$name.jwt"
    if [ -n "${SECSYNC_STACK_JWT_KEY_FILE:-}" ]; then
      echo "$SECSYNC_STACK_JWT_KEY_FILE" >"$dir/$name.jwt"
    fi
    start_gateway "$name" "${4:?PERSISTENCE_URL required}" "${5:-0}"
    ;;
  restart-gateway)
    name=${3:?NAME required}
    port=$(cat "$dir/$name.port")
    stop_pid "$dir/$name.pid"
    # Keep the old log lines; the new process logs its address again.
    mv "$dir/$name.log" "$dir/$name.log.$(date +%s%N)"
    : >"$dir/$name.log"
    start_again "$name" "$port" >/dev/null
    ;;
  stop)
    for pidfile in "$dir"/*.pid; do
      [ -e "$pidfile" ] || continue
      case "$pidfile" in */persistence.pid) continue ;; esac
      stop_pid "$pidfile"
    done
    stop_pid "$dir/persistence.pid"
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
