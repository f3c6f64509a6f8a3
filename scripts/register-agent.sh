#!/usr/bin/env bash
# Registers an agent on a running EchoCenter server and prints ONLY its new API token on stdout.
#
#   scripts/register-agent.sh [--description TEXT] [--token TOKEN] NAME
#
#   TOKEN=$(scripts/register-agent.sh build-bot) || exit
#
# Talks to the HTTP API with curl: POST /api/auth/login, then POST /api/users/agents.
# (On the server host itself, `echocenter agent add NAME` does the same on the database file.)
#
# Environment:
#   ECHOCENTER_URL             server base URL (default http://localhost:8080)
#   ECHOCENTER_ADMIN_USER      admin username (default admin)
#   ECHOCENTER_ADMIN_PASSWORD  admin password. When unset, the development default `admin123`
#                              is tried and a note is printed on stderr; set it for any server
#                              started with a configured or production (random) password.
#
# Secrets never appear in process arguments: request bodies go to curl on stdin and the
# Authorization header through a file descriptor.
#
# Exit status:
#   0  registered; the token is the only thing on stdout
#   1  any other error (invalid name or token, rate limited, server error, bad response)
#   2  usage error
#   3  server unreachable (connection refused, unknown host, timeout)
#   4  login refused (bad credentials) or the user is not an admin
#   5  conflict (409): the name is taken (also a supplied --token already in use)
set -euo pipefail

readonly EXIT_OTHER=1 EXIT_USAGE=2 EXIT_DOWN=3 EXIT_AUTH=4 EXIT_TAKEN=5
prog=${0##*/}

usage() {
  cat >&2 <<EOF
usage: $prog [--description TEXT] [--token TOKEN] NAME

Registers agent NAME on \$ECHOCENTER_URL (default http://localhost:8080) and prints its token.
Credentials: \$ECHOCENTER_ADMIN_USER (default admin), \$ECHOCENTER_ADMIN_PASSWORD
(default: the development password admin123).
Exit: 0 ok, 1 other error, 2 usage, 3 server unreachable, 4 bad credentials, 5 name taken.
EOF
}

die() {
  local code=$1
  shift
  printf '%s: %s\n' "$prog" "$*" >&2
  exit "$code"
}

command -v curl >/dev/null 2>&1 || die "$EXIT_OTHER" "curl is required"
command -v python3 >/dev/null 2>&1 || die "$EXIT_OTHER" "python3 is required"

name="" description="" token=""
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --description) [ $# -ge 2 ] || { usage; exit "$EXIT_USAGE"; }; description=$2; shift 2 ;;
    --description=*) description=${1#*=}; shift ;;
    --token) [ $# -ge 2 ] || { usage; exit "$EXIT_USAGE"; }; token=$2; shift 2 ;;
    --token=*) token=${1#*=}; shift ;;
    --) shift; break ;;
    -*) printf '%s: unknown option %s\n' "$prog" "$1" >&2; usage; exit "$EXIT_USAGE" ;;
    *) [ -z "$name" ] || { usage; exit "$EXIT_USAGE"; }; name=$1; shift ;;
  esac
done
for arg in "$@"; do
  [ -z "$name" ] || { usage; exit "$EXIT_USAGE"; }
  name=$arg
done
[ -n "$name" ] || { usage; exit "$EXIT_USAGE"; }

base=${ECHOCENTER_URL:-http://localhost:8080}
base=${base%/}
base=${base%/api}
case $base in
  http://* | https://*) ;;
  *) die "$EXIT_USAGE" "ECHOCENTER_URL must start with http:// or https:// (got '$base')" ;;
esac
admin_user=${ECHOCENTER_ADMIN_USER:-admin}
if [ -z "${ECHOCENTER_ADMIN_PASSWORD:-}" ]; then
  printf '%s: ECHOCENTER_ADMIN_PASSWORD is not set; trying the development default\n' "$prog" >&2
fi
admin_password=${ECHOCENTER_ADMIN_PASSWORD:-admin123}

# http METHOD PATH [BEARER [BODY]]
# Sets HTTP_STATUS and HTTP_BODY; exits with EXIT_DOWN when the server cannot be reached.
HTTP_STATUS="" HTTP_BODY=""
http() {
  local method=$1 path=$2 bearer=${3:-} body=${4:-} out rc=0
  local -a args=(-s -X "$method" --connect-timeout 5 --max-time 30
    -H 'Accept: application/json' -w '\n%{http_code}')
  if [ "$method" != GET ]; then
    args+=(-H 'Content-Type: application/json' --data-binary @-)
  fi
  if [ -n "$bearer" ]; then
    out=$(curl "${args[@]}" -H @<(printf 'Authorization: Bearer %s\n' "$bearer") \
      "$base$path" <<<"$body") || rc=$?
  else
    out=$(curl "${args[@]}" "$base$path" <<<"$body") || rc=$?
  fi
  case $rc in
    0) ;;
    6) die "$EXIT_DOWN" "cannot resolve the host of $base (is ECHOCENTER_URL right?)" ;;
    7) die "$EXIT_DOWN" "cannot connect to $base: is the EchoCenter server running?" ;;
    28) die "$EXIT_DOWN" "timed out talking to $base" ;;
    52 | 56) die "$EXIT_DOWN" "the server at $base closed the connection" ;;
    *) die "$EXIT_OTHER" "curl failed talking to $base (curl exit $rc)" ;;
  esac
  HTTP_STATUS=${out##*$'\n'}
  HTTP_BODY=${out%$'\n'*}
}

# json_field KEY < JSON — prints the string/number at KEY, nothing if absent or not JSON.
json_field() {
  python3 -c '
import json, sys
try:
    v = json.load(sys.stdin).get(sys.argv[1])
except Exception:
    v = None
if isinstance(v, (str, int, float)) and not isinstance(v, bool):
    print(v)
' "$1"
}

error_of() { json_field error <<<"$HTTP_BODY"; }

# 1. Log in.
login_body=$(EC_USER=$admin_user EC_PASSWORD=$admin_password python3 -c '
import json, os
print(json.dumps({"username": os.environ["EC_USER"], "password": os.environ["EC_PASSWORD"]}))
')
http POST /api/auth/login "" "$login_body"
case $HTTP_STATUS in
  200) ;;
  401) die "$EXIT_AUTH" "login as '$admin_user' refused: invalid credentials (set ECHOCENTER_ADMIN_USER / ECHOCENTER_ADMIN_PASSWORD)" ;;
  429) die "$EXIT_OTHER" "login rate limited by the server: $(error_of); try again later" ;;
  404) die "$EXIT_OTHER" "no EchoCenter API at $base (HTTP 404 on /api/auth/login)" ;;
  *) die "$EXIT_OTHER" "login failed: HTTP $HTTP_STATUS $(error_of)" ;;
esac
jwt=$(json_field token <<<"$HTTP_BODY")
[ -n "$jwt" ] || die "$EXIT_OTHER" "login answered 200 without a token"

# 2. Register the agent.
register_body=$(EC_NAME=$name EC_DESCRIPTION=$description EC_TOKEN=$token python3 -c '
import json, os
body = {"username": os.environ["EC_NAME"]}
if os.environ["EC_DESCRIPTION"]:
    body["description"] = os.environ["EC_DESCRIPTION"]
if os.environ["EC_TOKEN"]:
    body["api_token"] = os.environ["EC_TOKEN"]
print(json.dumps(body))
')
http POST /api/users/agents "$jwt" "$register_body"
case $HTTP_STATUS in
  201) ;;
  409) die "$EXIT_TAKEN" "cannot register '$name': $(error_of)" ;;
  401 | 403) die "$EXIT_AUTH" "'$admin_user' may not register agents: $(error_of)" ;;
  400) die "$EXIT_OTHER" "cannot register '$name': $(error_of)" ;;
  *) die "$EXIT_OTHER" "registering '$name' failed: HTTP $HTTP_STATUS $(error_of)" ;;
esac
api_token=$(json_field api_token <<<"$HTTP_BODY")
[ -n "$api_token" ] || die "$EXIT_OTHER" "the server answered 201 without an api_token"
printf '%s\n' "$api_token"
