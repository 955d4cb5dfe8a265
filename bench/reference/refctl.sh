#!/bin/sh
# Start, stop or restart one reference server instance in the background.
#
#   refctl.sh start   DIR [PORT]   start on PORT (default 0 = free port); prints the ws:// URL
#   refctl.sh stop    DIR          SIGTERM (state is saved to DIR/state.json), wait for exit
#   refctl.sh restart DIR          stop, then start again on the same port
#
# DIR holds pid, port, state.json and server.log of that instance. Suitable as the e2e
# suite's SECSYNC_E2E_RESTART_CMD_<i>, e.g. "bench/reference/refctl.sh restart /tmp/ref0".
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:?usage: refctl.sh start|stop|restart DIR [PORT]}
dir=${2:?usage: refctl.sh start|stop|restart DIR [PORT]}
mkdir -p "$dir"

start() {
  port=$1
  : >"$dir/ready"
  PORT=$port REF_STATE_FILE="$dir/state.json" \
    nohup node "$here/server.mjs" >"$dir/ready" 2>>"$dir/server.log" </dev/null &
  echo $! >"$dir/pid"
  # wait (up to 10 s) for the "listening" line instead of guessing a delay
  i=0
  while ! grep -q '^listening ' "$dir/ready"; do
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "reference server exited during start-up; see $dir/server.log" >&2
      exit 1
    fi
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then
      echo "reference server did not start within 10 s" >&2
      exit 1
    fi
    sleep 0.05
  done
  url=$(sed -n 's/^listening //p' "$dir/ready")
  echo "${url##*:}" >"$dir/port"
  echo "$url"
}

stop() {
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  if kill "$pid" 2>/dev/null; then
    i=0
    while kill -0 "$pid" 2>/dev/null; do
      i=$((i + 1))
      if [ "$i" -gt 200 ]; then
        kill -9 "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.05
    done
  fi
  rm -f "$dir/pid"
}

case "$cmd" in
  start) start "${3:-0}" ;;
  stop) stop ;;
  restart)
    port=$(cat "$dir/port")
    stop
    start "$port" >/dev/null
    ;;
  *) echo "unknown command: $cmd" >&2; exit 2 ;;
esac
