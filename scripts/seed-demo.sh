#!/usr/bin/env bash
# Seeds a running EchoCenter server with the demo world, through the HTTP API only:
#
#   - agents Observer, Diagnoser, Guardian and Storage-Custodian, with the fixed tokens
#     mock-observer-token, mock-diagnoser-token, mock-guardian-token and
#     mock-storage-custodian-token (POST /api/users/agents with api_token);
#   - 21 dashboard log rows (4 per agent + 5 more) via POST /api/messages;
#   - a short chat history between the admin and Observer, Diagnoser and Guardian via
#     POST /api/dev/mock/chat (development servers only; skipped with a warning in production).
#
#   scripts/seed-demo.sh
#
# Idempotent: running it again adds nothing.
#   - Agents: a 409 means the agent exists; the script then checks with
#     POST /api/users/agents/test-connection that the demo token still belongs to it
#     (a warning if it was rotated; the script never rotates or deletes anything).
#   - Log rows: POST /api/messages has no idempotency key, so before posting each row the
#     script looks for a row with the same agent, level and exact content
#     (GET /api/messages?agent_id=&level=&q=) and skips it if present. This is per row, so an
#     interrupted run is completed by the next one. (Not safe against two seeders running at
#     the same moment.)
#   - Chat rows: each carries a fixed local_id (`seed-demo:<agent>:<n>`); the server stores a
#     repeated local_id of the same sender only once.
#
# Environment (as scripts/register-agent.sh):
#   ECHOCENTER_URL             server base URL (default http://localhost:8080)
#   ECHOCENTER_ADMIN_USER      admin username (default admin)
#   ECHOCENTER_ADMIN_PASSWORD  admin password (default: the development password admin123,
#                              with a note on stderr)
#
# Progress goes to stdout, problems to stderr.
# Exit status: 0 seeded (possibly with warnings), 1 other error, 2 usage error,
#              3 server unreachable, 4 login refused / not an admin.
set -euo pipefail

prog=${0##*/}
# shellcheck source=SCRIPTDIR/lib/api.sh
. "$(dirname "$0")/lib/api.sh"

case ${1:-} in
  "") ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "$EXIT_USAGE" "no arguments expected (see --help)" ;;
esac

# json_string S — S as a JSON string literal (pure bash: the demo strings are plain text).
json_string() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

# json_object KEY VALUE [KEY VALUE...] — prints a JSON object of string values.
json_object() {
  local out="" sep=""
  while [ $# -ge 2 ]; do
    out+="$sep$(json_string "$1"):$(json_string "$2")"
    sep=,
    shift 2
  done
  printf '{%s}\n' "$out"
}

# --- 1. log in ---------------------------------------------------------------------------
admin_login
echo "Seeding the EchoCenter demo world on $base as '$admin_user'."

# --- 2. agents -----------------------------------------------------------------------------
agents=(Observer Diagnoser Guardian Storage-Custodian)
declare -A token_of=(
  [Observer]=mock-observer-token
  [Diagnoser]=mock-diagnoser-token
  [Guardian]=mock-guardian-token
  [Storage-Custodian]=mock-storage-custodian-token
)
declare -A description_of=(
  [Observer]="Watches runtime signals and reports anomalies."
  [Diagnoser]="Correlates failures and proposes root causes."
  [Guardian]="Gates risky operations and audits credentials."
  [Storage-Custodian]="Keeps disks, archives and backups in order (the demo's live mock agent)."
)
created=0
declare -A registered # agents that exist on the server (registered now or before)
for agent in "${agents[@]}"; do
  body=$(json_object username "$agent" api_token "${token_of[$agent]}" \
    description "${description_of[$agent]}")
  http POST /api/users/agents "$jwt" "$body"
  case $HTTP_STATUS in
    201)
      registered[$agent]=1
      created=$((created + 1))
      echo "  agent $agent: registered"
      ;;
    409)
      # Already there (a re-run): check that the demo token still belongs to this agent.
      conflict=$(error_of)
      [ "$conflict" != "username already exists" ] || registered[$agent]=1
      http POST /api/users/agents/test-connection "$jwt" \
        "$(json_object api_token "${token_of[$agent]}")"
      owner=""
      if [ "$HTTP_STATUS" = 200 ] && [ "$(json_field ok <<<"$HTTP_BODY")" = true ]; then
        owner=$(json_field agent_name <<<"$HTTP_BODY")
      fi
      if [ "$owner" = "$agent" ]; then
        echo "  agent $agent: already present"
      else
        warn "$agent: $conflict, and ${token_of[$agent]} belongs to ${owner:-no agent} (rotated or taken?); left as is"
      fi
      ;;
    401 | 403) die "$EXIT_AUTH" "'$admin_user' may not register agents: $(error_of)" ;;
    *) die "$EXIT_OTHER" "registering $agent failed: HTTP $HTTP_STATUS $(error_of)" ;;
  esac
done

# --- 3. dashboard log rows (21) ---------------------------------------------------------------
# One row per line: agent|level|content.
logs=()
for agent in "${agents[@]}"; do
  logs+=(
    "$agent|INFO|$agent heartbeat nominal; ready for dispatch."
    "$agent|INFO|$agent completed scheduled diagnostics pass."
    "$agent|WARNING|$agent detected minor drift in response latency; mitigation applied."
    "$agent|INFO|$agent exported the latest telemetry snapshot to the central archive."
  )
done
logs+=(
  "Guardian|ERROR|Credential rotation check failed for one expired sandbox token."
  "Diagnoser|ERROR|Root-cause analysis timed out on an oversized trace bundle."
  "Storage-Custodian|INFO|Recovered orphaned block metadata and reconciled index entries."
  "Observer|INFO|WebSocket relay stable; no frame loss in the last interval."
  "Observer|WARNING|Event ingestion lag above 2 s for one minute; back to normal."
)
# Look every row up first (GET, by agent, level and content), then post the missing ones.
mapfile -t queries < <(printf '%s\n' "${logs[@]}" | python3 -c '
import sys, urllib.parse
for line in sys.stdin.read().splitlines():
    a, l, c = line.split("|", 2)
    print(urllib.parse.urlencode({"agent_id": a, "level": l, "q": c, "limit": 200}))
')
[ "${#queries[@]}" -eq "${#logs[@]}" ] || die "$EXIT_OTHER" "internal error building log queries"
lookups=()
for i in "${!logs[@]}"; do
  http GET "/api/messages?${queries[$i]}" "$jwt"
  [ "$HTTP_STATUS" = 200 ] || die "$EXIT_OTHER" "reading logs failed: HTTP $HTTP_STATUS $(error_of)"
  lookups+=("${logs[$i]}" "$HTTP_BODY")
done
# Indices of rows with no stored row of exactly that agent, level and content.
mapfile -t missing < <(printf '%s\0' "${lookups[@]}" | python3 -c '
import json, sys
items = sys.stdin.buffer.read().decode().split("\0")[:-1]
for i in range(0, len(items), 2):
    agent, level, content = items[i].split("|", 2)
    rows = json.loads(items[i + 1])
    if not any(r.get("agent_id") == agent and r.get("level") == level
               and r.get("content") == content for r in rows):
        print(i // 2)
')
for i in "${missing[@]}"; do
  IFS='|' read -r agent level content <<<"${logs[$i]}"
  http POST /api/messages "$jwt" \
    "$(json_object agent_id "$agent" level "$level" content "$content")"
  [ "$HTTP_STATUS" = 201 ] || die "$EXIT_OTHER" "posting a log row failed: HTTP $HTTP_STATUS $(error_of)"
done
added=${#missing[@]}
present=$((${#logs[@]} - added))
echo "  dashboard logs: $added added, $present already present (${#logs[@]} in the demo set)"

# --- 4. chat history (development servers only) ---------------------------------------------
chats=0
chat_skipped=""
for agent in Observer Diagnoser Guardian; do
  [ -z "$chat_skipped" ] || break
  if [ -z "${registered[$agent]:-}" ]; then
    warn "no chat history for $agent: it could not be registered"
    continue
  fi
  n=0
  for line in \
    "$agent|$admin_user|Initial link established with $agent." \
    "$admin_user|$agent|Acknowledged. Report current status." \
    "$agent|$admin_user|Status nominal. Task queue is clear."; do
    n=$((n + 1))
    IFS='|' read -r sender receiver content <<<"$line"
    http POST /api/dev/mock/chat "$jwt" "$(json_object sender_username "$sender" \
      receiver_username "$receiver" type CHAT content "$content" local_id "seed-demo:$agent:$n")"
    case $HTTP_STATUS in
      201) chats=$((chats + 1)) ;;
      403)
        warn "chat history skipped: $(error_of)"
        chat_skipped=1
        break
        ;;
      *) die "$EXIT_OTHER" "seeding chat with $agent failed: HTTP $HTTP_STATUS $(error_of)" ;;
    esac
  done
done
[ -n "$chat_skipped" ] || echo "  chat history: $chats rows in place (stored once, keyed by local_id)"

echo "Done: $created agent(s) registered. Agent tokens:"
for agent in "${agents[@]}"; do
  printf '  %-18s %s\n' "$agent" "${token_of[$agent]}"
done
