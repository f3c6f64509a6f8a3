#!/usr/bin/env bash
# The command line of `echocenter agent|user ...`, against a live server over its HTTP API
# (curl), for hosts that do not have the database file:
#
#   scripts/echocenter-api.sh agent add NAME [--description D]   prints only the new token
#   scripts/echocenter-api.sh agent list
#   scripts/echocenter-api.sh agent rotate NAME                  prints only the new token
#   scripts/echocenter-api.sh agent remove NAME
#   scripts/echocenter-api.sh user add NAME --role ADMIN|MEMBER  password read from stdin
#
# Environment and exit status as scripts/register-agent.sh (see scripts/lib/api.sh):
#   0 ok, 1 other error, 2 usage, 3 server unreachable, 4 login refused / not an admin,
#   5 conflict (name taken), 6 no such agent.
set -euo pipefail

prog=${0##*/}
# shellcheck source=SCRIPTDIR/lib/api.sh
. "$(dirname "$0")/lib/api.sh"
readonly EXIT_MISSING=6

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

noun=${1:-} verb=${2:-}
[ $# -ge 2 ] || { usage; exit "$EXIT_USAGE"; }
shift 2
name="" description="" role=""
while [ $# -gt 0 ]; do
  case $1 in
    --description) [ $# -ge 2 ] || { usage; exit "$EXIT_USAGE"; }; description=$2; shift 2 ;;
    --role) [ $# -ge 2 ] || { usage; exit "$EXIT_USAGE"; }; role=$2; shift 2 ;;
    -*) usage; exit "$EXIT_USAGE" ;;
    *) [ -z "$name" ] || { usage; exit "$EXIT_USAGE"; }; name=$1; shift ;;
  esac
done

# agent_id NAME — the id of the live agent (or Butler) called NAME; exits 6 if none.
agent_id() {
  http GET "/api/users/agents?q=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1")" "$jwt"
  [ "$HTTP_STATUS" = 200 ] || die "$EXIT_OTHER" "listing agents failed: HTTP $HTTP_STATUS $(error_of)"
  local id
  id=$(EC_NAME=$1 python3 -c '
import json, os, sys
for u in json.load(sys.stdin):
    if u["username"] == os.environ["EC_NAME"]:
        print(u["id"])
' <<<"$HTTP_BODY")
  [ -n "$id" ] || die "$EXIT_MISSING" "agent not found: $1"
  printf '%s\n' "$id"
}

case "$noun $verb" in
  "agent add")
    [ -n "$name" ] || { usage; exit "$EXIT_USAGE"; }
    args=("$name")
    [ -z "$description" ] || args=(--description "$description" "$name")
    exec "$(dirname "$0")/register-agent.sh" "${args[@]}"
    ;;
  "agent list")
    [ -z "$name" ] || { usage; exit "$EXIT_USAGE"; }
    admin_login
    http GET /api/users/agents "$jwt"
    [ "$HTTP_STATUS" = 200 ] || die "$EXIT_OTHER" "listing agents failed: HTTP $HTTP_STATUS $(error_of)"
    python3 - "$HTTP_BODY" <<'PY'
import json, sys
row = "{:<6} {:<32} {:<7} {:<16} {:<8} {}"
print(row.format("ID", "USERNAME", "ROLE", "TOKEN", "STATUS", "LAST SEEN"))
for u in json.loads(sys.argv[1]):
    print(row.format(u["id"], u["username"], u["role"], u.get("token_hint") or "-",
                     u.get("status", "-"), u.get("last_seen_at") or "never"))
PY
    ;;
  "agent rotate")
    [ -n "$name" ] || { usage; exit "$EXIT_USAGE"; }
    admin_login
    id=$(agent_id "$name")
    http PATCH "/api/users/agents/$id/token" "$jwt" '{}'
    [ "$HTTP_STATUS" = 200 ] || die "$EXIT_OTHER" "rotating $name failed: HTTP $HTTP_STATUS $(error_of)"
    json_field api_token <<<"$HTTP_BODY"
    ;;
  "agent remove")
    [ -n "$name" ] || { usage; exit "$EXIT_USAGE"; }
    admin_login
    id=$(agent_id "$name")
    http DELETE "/api/users/agents/$id" "$jwt"
    [ "$HTTP_STATUS" = 200 ] || die "$EXIT_OTHER" "removing $name failed: HTTP $HTTP_STATUS $(error_of)"
    printf '%s: removed agent %s (id %s); its history is kept\n' "$prog" "$name" "$id" >&2
    ;;
  "user add")
    [ -n "$name" ] || { usage; exit "$EXIT_USAGE"; }
    case $role in
      ADMIN | MEMBER | admin | member) ;;
      *) die "$EXIT_USAGE" "--role ADMIN or --role MEMBER is required" ;;
    esac
    password=$(cat)
    [ -n "$password" ] || die "$EXIT_USAGE" "empty password: pipe it on stdin"
    admin_login
    body=$(EC_NAME=$name EC_ROLE=$role EC_PASSWORD=$password python3 -c '
import json, os
print(json.dumps({"username": os.environ["EC_NAME"], "role": os.environ["EC_ROLE"].upper(),
                  "password": os.environ["EC_PASSWORD"]}))
')
    http POST /api/users "$jwt" "$body"
    case $HTTP_STATUS in
      201) printf '%s: created %s %s (id %s)\n' "$prog" "${role^^}" "$name" "$(json_field id <<<"$HTTP_BODY")" >&2 ;;
      409) die "$EXIT_CONFLICT" "cannot create $name: $(error_of)" ;;
      *) die "$EXIT_OTHER" "creating $name failed: HTTP $HTTP_STATUS $(error_of)" ;;
    esac
    ;;
  *) usage; exit "$EXIT_USAGE" ;;
esac
