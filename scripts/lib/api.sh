# shellcheck shell=bash
# The small HTTP client the shell scripts share: sourced by register-agent.sh, seed-demo.sh
# and echocenter-api.sh. The caller sets `prog` first.
#
# Environment:
#   ECHOCENTER_URL             server base URL (default http://localhost:8080)
#   ECHOCENTER_ADMIN_USER      admin username (default admin)
#   ECHOCENTER_ADMIN_PASSWORD  admin password (default: the development password admin123,
#                              with a note on stderr)
#
# Secrets never appear in process arguments: request bodies go to curl on stdin and the
# Authorization header through a file descriptor.

# Exit statuses shared by every script (not all of them use all of them).
# shellcheck disable=SC2034
readonly EXIT_OTHER=1 EXIT_USAGE=2 EXIT_DOWN=3 EXIT_AUTH=4 EXIT_CONFLICT=5
: "${prog:?set prog before sourcing lib/api.sh}"

die() {
  local code=$1
  shift
  printf '%s: %s\n' "$prog" "$*" >&2
  exit "$code"
}
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }

command -v curl >/dev/null 2>&1 || die "$EXIT_OTHER" "curl is required"
command -v python3 >/dev/null 2>&1 || die "$EXIT_OTHER" "python3 is required"

base=${ECHOCENTER_URL:-http://localhost:8080}
base=${base%/}
base=${base%/api}
case $base in
  http://* | https://*) ;;
  *) die "$EXIT_USAGE" "ECHOCENTER_URL must start with http:// or https:// (got '$base')" ;;
esac
admin_user=${ECHOCENTER_ADMIN_USER:-admin}

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

# json_field KEY < JSON — prints the string/number/bool at KEY; nothing if absent or not JSON.
json_field() {
  python3 -c '
import json, sys
try:
    v = json.load(sys.stdin).get(sys.argv[1])
except Exception:
    v = None
if isinstance(v, bool):
    print("true" if v else "false")
elif isinstance(v, (str, int, float)):
    print(v)
' "$1"
}

error_of() { json_field error <<<"$HTTP_BODY"; }

# admin_login — logs in as the admin; sets `jwt`. Exits 4 on refused credentials.
admin_login() {
  if [ -z "${ECHOCENTER_ADMIN_PASSWORD:-}" ]; then
    printf '%s: ECHOCENTER_ADMIN_PASSWORD is not set; trying the development default\n' "$prog" >&2
  fi
  local body
  body=$(EC_USER=$admin_user EC_PASSWORD=${ECHOCENTER_ADMIN_PASSWORD:-admin123} python3 -c '
import json, os
print(json.dumps({"username": os.environ["EC_USER"], "password": os.environ["EC_PASSWORD"]}))
')
  http POST /api/auth/login "" "$body"
  case $HTTP_STATUS in
    200) ;;
    401) die "$EXIT_AUTH" "login as '$admin_user' refused: invalid credentials (set ECHOCENTER_ADMIN_USER / ECHOCENTER_ADMIN_PASSWORD)" ;;
    429) die "$EXIT_OTHER" "login rate limited by the server: $(error_of); try again later" ;;
    404) die "$EXIT_OTHER" "no EchoCenter API at $base (HTTP 404 on /api/auth/login)" ;;
    *) die "$EXIT_OTHER" "login failed: HTTP $HTTP_STATUS $(error_of)" ;;
  esac
  jwt=$(json_field token <<<"$HTTP_BODY")
  [ -n "$jwt" ] || die "$EXIT_OTHER" "login answered 200 without a token"
}
