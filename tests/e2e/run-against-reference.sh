#!/bin/sh
# Run the suite against the reference server (bench/reference): start it on a free loopback
# port with a restart hook, run, stop it. Extra environment (e.g. SECSYNC_E2E_FILTER) passes
# through. Exit status is the suite's.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
ref="$here/../../bench/reference"
dir=$(mktemp -d "${TMPDIR:-/tmp}/secsync-ref.XXXXXX")

cleanup() {
  "$ref/refctl.sh" stop "$dir" || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

url=$("$ref/refctl.sh" start "$dir")
status=0
SECSYNC_E2E_ENDPOINTS="$url" \
  SECSYNC_E2E_RESTART_CMD_0="'$ref/refctl.sh' restart '$dir'" \
  node "$here/run.mjs" || status=$?
exit "$status"
