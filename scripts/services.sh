# Shared by tests/run.sh and scripts/run-local.sh (sourced, not run): make sure PostgreSQL and
# NATS are there, installing them from Debian's packages and starting them when needed.
# Expects a `log` function.

# PostgreSQL on 127.0.0.1:5432 with trust auth for the local test user: started if it is not
# running, installed from Debian's packages if it is absent.
started_postgres=""
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
  started_postgres=yes
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return
    sleep 0.5 # polling a server we just started; there is no event to wait on
  done
  echo "PostgreSQL did not become ready" >&2
  exit 1
}
# NATS with JetStream on 127.0.0.1:4222: started (and stopped at the end) if it is not running,
# installed from Debian's packages if absent.
started_nats=""
ensure_nats() {
  if (echo >/dev/tcp/127.0.0.1/4222) 2>/dev/null; then return; fi
  if ! command -v nats-server >/dev/null 2>&1; then
    log "installing NATS"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
  log "starting NATS"
  local store
  store=$(mktemp -d "${TMPDIR:-/tmp}/secsync-nats.XXXXXX")
  nohup nats-server -js -a 127.0.0.1 -p 4222 -sd "$store" >"$store/nats.log" 2>&1 </dev/null &
  started_nats=$!
  for _ in $(seq 1 100); do
    (echo >/dev/tcp/127.0.0.1/4222) 2>/dev/null && return
    sleep 0.1 # polling a server we just started
  done
  echo "NATS did not start" >&2
  exit 1
}


# Stops what ensure_postgres / ensure_nats started (nothing that was already running).
stop_started_services() {
  if [ -n "$started_nats" ]; then kill "$started_nats" 2>/dev/null || true; fi
  if [ -n "$started_postgres" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main stop || true
  fi
}
