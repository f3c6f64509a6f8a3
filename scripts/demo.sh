#!/usr/bin/env bash
# One-command demo: builds EchoCenter (if needed), starts it on a throw-away database, seeds
# the demo world (scripts/seed-demo.sh), connects the mock agent (scripts/mock-agent.py) as
# Storage-Custodian and the Butler (scripts/butler.py, with the Butler's token from the dev
# endpoint), prints the URL and credentials, and cleans everything up on Ctrl-C.
#
#   scripts/demo.sh [--port N] [--host ADDR]      (a bare number is taken as the port)
#
# Port: N, else $ECHOCENTER_DEMO_PORT, else any free port (the server binds port 0 and
# reports the one it got). Host: 127.0.0.1 unless --host / $ECHOCENTER_DEMO_HOST says otherwise.
#
# Environment:
#   ECHOCENTER_BIN             use this server binary instead of `cargo build --release`
#                              (without cargo, an existing target/release/echocenter is used)
#   ECHOCENTER_PYTHON          Python with websocket-client for the mock agent and the
#                              Butler; otherwise
#                              python3 if it has it, else the venv target/venv (created and
#                              filled from PyPI on first use)
#   ECHOCENTER_ADMIN_PASSWORD  admin password for the demo server (default admin123)
#   ECHOCENTER_DEMO_KEEP=1     keep the temporary directory (database and logs) on exit
#
# The server, the mock agent, the Butler and the temporary directory live only as long as
# this script:
# Ctrl-C (SIGINT), SIGTERM, or either child dying ends the demo and removes them.
set -euo pipefail

prog=${0##*/}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
  printf '%s: %s\n' "$prog" "$*" >&2
  exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

port=${ECHOCENTER_DEMO_PORT:-0}
host=${ECHOCENTER_DEMO_HOST:-127.0.0.1}
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    --port) [ $# -ge 2 ] || die "--port needs a value"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --host) [ $# -ge 2 ] || die "--host needs a value"; host=$2; shift 2 ;;
    --host=*) host=${1#*=}; shift ;;
    [0-9]*) port=$1; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case $port in
  '' | *[!0-9]*) die "invalid port '$port'" ;;
esac
[ "$port" -le 65535 ] || die "invalid port '$port'"
admin_password=${ECHOCENTER_ADMIN_PASSWORD:-admin123}
admin_user=${ECHOCENTER_ADMIN_USER:-admin}
command -v curl >/dev/null 2>&1 || die "curl is required"
command -v python3 >/dev/null 2>&1 || die "python3 is required"

# --- state and cleanup -------------------------------------------------------------------------
workdir="" server_pid="" agent_pid="" butler_pid=""

running() {
  # True while PID exists and is not a zombie (our children stay zombies until reaped).
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  case $state in Z*) return 1 ;; esac
  return 0
}

stop() {
  # stop PID NAME: SIGTERM, up to 10 s to exit, then SIGKILL; always reaps the child.
  local pid=$1 what=$2 deadline
  [ -n "$pid" ] || return 0
  if running "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while running "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
      sleep 0.1
    done
    if running "$pid"; then
      note "$what did not stop within 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  trap '' INT TERM # a second Ctrl-C must not interrupt the cleanup
  stop "$butler_pid" "Butler"
  stop "$agent_pid" "mock agent"
  stop "$server_pid" "server"
  if [ -n "$workdir" ]; then
    if [ "${ECHOCENTER_DEMO_KEEP:-}" = 1 ]; then
      note "kept $workdir"
    else
      rm -rf -- "$workdir"
    fi
  fi
  [ "$rc" -ne 0 ] || note "demo stopped; everything cleaned up"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo >&2; note "interrupted, shutting down"; exit 0' INT
trap 'note "terminated, shutting down"; exit 0' TERM

tail_log() {
  if [ -s "$1" ]; then
    note "last lines of $1:"
    tail -n 20 "$1" >&2
  fi
}

# --- 1. the server binary ------------------------------------------------------------------
if [ -n "${ECHOCENTER_BIN:-}" ]; then
  bin=$ECHOCENTER_BIN
elif command -v cargo >/dev/null 2>&1; then
  note "building the release binary (cargo build --release; quick when up to date)"
  (cd "$root" && cargo build --release --quiet --bin echocenter) >&2 || die "the build failed"
  bin=$root/target/release/echocenter
elif [ -x "$root/target/release/echocenter" ]; then
  bin=$root/target/release/echocenter
else
  die "no cargo and no target/release/echocenter: install Rust or set ECHOCENTER_BIN"
fi
[ -x "$bin" ] || die "not an executable: $bin"

# --- 2. Python with websocket-client for the mock agent and the Butler --------------------
has_ws_client() { "$1" -c 'import websocket; websocket.create_connection' >/dev/null 2>&1; }
python=""
for candidate in "${ECHOCENTER_PYTHON:-}" python3 "$root/target/venv/bin/python"; do
  if [ -n "$candidate" ] && has_ws_client "$candidate"; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  [ -z "${ECHOCENTER_PYTHON:-}" ] || die "$ECHOCENTER_PYTHON cannot import websocket-client"
  venv=$root/target/venv
  note "websocket-client not found; installing it into $venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv failed"
  if [ -f "$root/tests/requirements.txt" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -r "$root/tests/requirements.txt" >&2 || die "pip install failed"
  else
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      websocket-client >&2 || die "pip install failed"
  fi
  has_ws_client "$venv/bin/python" || die "websocket-client still not importable from $venv"
  python=$venv/bin/python
fi

# --- 3. the server -------------------------------------------------------------------------
workdir=$(mktemp -d "${TMPDIR:-/tmp}/echocenter-demo.XXXXXX")
: >"$workdir/server.out"
# TMPDIR: the server's private socket directory goes inside $workdir too.
TMPDIR=$workdir ECHOCENTER_ADMIN_USER=$admin_user ECHOCENTER_ADMIN_PASSWORD=$admin_password \
  "$bin" serve --addr "$host:$port" --db "$workdir/echocenter.db" --env development \
  </dev/null >"$workdir/server.out" 2>"$workdir/server.log" &
server_pid=$!

addr=""
deadline=$((SECONDS + 30))
while [ -z "$addr" ]; do
  addr=$(sed -n 's/^listening on //p' "$workdir/server.out")
  [ -z "$addr" ] || break
  if ! running "$server_pid"; then
    tail_log "$workdir/server.log"
    die "the server did not start"
  fi
  [ "$SECONDS" -lt "$deadline" ] || die "the server did not report its address within 30 s"
  sleep 0.1
done
bound_port=${addr##*:}
case $host in
  0.0.0.0 | '[::]' | ::) local_host=127.0.0.1 ;;
  *) local_host=$host ;;
esac
url=http://$local_host:$bound_port
curl -fsS --max-time 5 "$url/api/ping" >/dev/null || die "the server does not answer at $url"

# --- 4. the demo world ---------------------------------------------------------------------
ECHOCENTER_URL=$url ECHOCENTER_ADMIN_USER=$admin_user ECHOCENTER_ADMIN_PASSWORD=$admin_password \
  "$root/scripts/seed-demo.sh" >"$workdir/seed.log" 2>&1 || {
  tail_log "$workdir/seed.log"
  die "seeding failed"
}

# --- 5. the mock agent ---------------------------------------------------------------------
agent_token=mock-storage-custodian-token
ECHOCENTER_URL=$url ECHOCENTER_AGENT_TOKEN=$agent_token \
  "$python" "$root/scripts/mock-agent.py" --watch-dir "$workdir" \
  </dev/null >/dev/null 2>"$workdir/agent.log" &
agent_pid=$!

login_body=$(EC_USER=$admin_user EC_PASSWORD=$admin_password python3 -c '
import json, os
print(json.dumps({"username": os.environ["EC_USER"], "password": os.environ["EC_PASSWORD"]}))
')
jwt=$(curl -fsS --max-time 5 -H 'Content-Type: application/json' --data-binary @- \
  "$url/api/auth/login" <<<"$login_body" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])') ||
  die "cannot log in as $admin_user"

agent_online() {
  curl -fsS --max-time 5 -H @<(printf 'Authorization: Bearer %s\n' "$jwt") \
    "$url/api/users/agents" 2>/dev/null | python3 -c '
import json, sys
agents = json.load(sys.stdin)
sys.exit(0 if any(a.get("username") == "Storage-Custodian" and a.get("online") is True
                  for a in agents) else 1)
'
}
deadline=$((SECONDS + 30))
until agent_online; do
  if ! running "$agent_pid"; then
    tail_log "$workdir/agent.log"
    die "the mock agent exited"
  fi
  [ "$SECONDS" -lt "$deadline" ] || {
    tail_log "$workdir/agent.log"
    die "the mock agent did not come online within 30 s"
  }
  sleep 0.2
done

# --- 6. the Butler -------------------------------------------------------------------------
# Its raw token from the development endpoint (admin only, refused in production); it goes to
# the Butler in its environment, never on a command line or the screen.
butler_token=$(curl -fsS --max-time 5 -H @<(printf 'Authorization: Bearer %s\n' "$jwt") \
  "$url/api/dev/mock/agent-token/Butler" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["api_token"])') ||
  die "cannot read the Butler's token from /api/dev/mock/agent-token/Butler"
[ -n "$butler_token" ] || die "the server keeps no raw token for the Butler"
ECHOCENTER_URL=$url ECHOCENTER_BUTLER_TOKEN=$butler_token \
  "$python" "$root/scripts/butler.py" </dev/null >/dev/null 2>"$workdir/butler.log" &
butler_pid=$!
butler_token=""

butler_online() {
  curl -fsS --max-time 5 -H @<(printf 'Authorization: Bearer %s\n' "$jwt") \
    "$url/api/users/butler" 2>/dev/null |
    python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("online") is True else 1)'
}
deadline=$((SECONDS + 30))
until butler_online; do
  if ! running "$butler_pid"; then
    tail_log "$workdir/butler.log"
    die "the Butler exited"
  fi
  [ "$SECONDS" -lt "$deadline" ] || {
    tail_log "$workdir/butler.log"
    die "the Butler did not come online within 30 s"
  }
  sleep 0.2
done
note "the Butler is running (pid $butler_pid): it forwards instructions to agents and asks approval for risky ones"

cat <<EOF

EchoCenter demo ready: $url/
  admin login:     $admin_user / $admin_password
  live mock agent: Storage-Custodian (chat with it from the dashboard; it streams replies)
  Butler:          running; tell it "@Storage-Custodian check the disk", or something risky
                   such as "@Storage-Custodian restart the storage service" (it asks you first)
  agent tokens:    Observer mock-observer-token, Diagnoser mock-diagnoser-token,
                   Guardian mock-guardian-token, Storage-Custodian $agent_token
  agent websocket: ws://$local_host:$bound_port/api/ws?token=<token>
  server pid:      $server_pid
  agent pid:       $agent_pid
  butler pid:      $butler_pid
  data dir:        $workdir (server.log, agent.log, butler.log, seed.log; removed on exit)
Press Ctrl-C to stop.
EOF

# --- 7. run until interrupted or a child dies ------------------------------------------------
agent_gone="" butler_gone=""
while :; do
  wait -n || true # returns when a child exits; a trapped signal exits via the traps above
  if ! running "$server_pid"; then
    tail_log "$workdir/server.log"
    note "the server stopped unexpectedly"
    exit 1
  fi
  if [ -z "$agent_gone" ] && ! running "$agent_pid"; then
    tail_log "$workdir/agent.log"
    note "the mock agent exited; the server keeps running (Ctrl-C to stop)"
    agent_gone=1
  fi
  if [ -z "$butler_gone" ] && ! running "$butler_pid"; then
    tail_log "$workdir/butler.log"
    note "the Butler exited; the server keeps running (Ctrl-C to stop)"
    butler_gone=1
  fi
done
