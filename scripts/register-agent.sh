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

prog=${0##*/}
# shellcheck source=SCRIPTDIR/lib/api.sh
. "$(dirname "$0")/lib/api.sh"

usage() {
  cat >&2 <<EOF
usage: $prog [--description TEXT] [--token TOKEN] NAME

Registers agent NAME on \$ECHOCENTER_URL (default http://localhost:8080) and prints its token.
Credentials: \$ECHOCENTER_ADMIN_USER (default admin), \$ECHOCENTER_ADMIN_PASSWORD
(default: the development password admin123).
Exit: 0 ok, 1 other error, 2 usage, 3 server unreachable, 4 bad credentials, 5 name taken.
EOF
}


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

# 1. Log in.
admin_login

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
  409) die "$EXIT_CONFLICT" "cannot register '$name': $(error_of)" ;;
  401 | 403) die "$EXIT_AUTH" "'$admin_user' may not register agents: $(error_of)" ;;
  400) die "$EXIT_OTHER" "cannot register '$name': $(error_of)" ;;
  *) die "$EXIT_OTHER" "registering '$name' failed: HTTP $HTTP_STATUS $(error_of)" ;;
esac
api_token=$(json_field api_token <<<"$HTTP_BODY")
[ -n "$api_token" ] || die "$EXIT_OTHER" "the server answered 201 without an api_token"
printf '%s\n' "$api_token"
