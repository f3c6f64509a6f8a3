#!/usr/bin/env bash
# Day-two benchmark (issue #12): what retention holds the disk to under a log flood, and how
# long an agent waits to be let in while humans search a large log. Builds release, runs two
# servers on temporary SQLite files one after the other, prints the figures and the raw JSON.
# Takes about 6-8 minutes on 2 cores.
#
#   scripts/bench-day-two.sh
#
# 1. flood: one agent sends one hour's worth of the default per-sender log limit
#    (--max-log-bytes-per-second 256 KiB/s × 3600 s ≈ 900 MiB, as 230,000 lines of 4,000
#    bytes) as fast as the server takes it. The server's per-sender limits are raised so the
#    hour passes in a minute or two; retention and the per-agent budgets stay at their
#    defaults (30 days, 100,000 rows, 64 MiB), so the disk is held by the budget.
# 2. search: a second server with the budgets off (`0`) is filled with ~560 MiB of logs (four
#    agents × 35,000 lines), then an agent's authentication (WebSocket handshake, REST /me) is
#    timed alone and while 7 threads search the log back to back.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "building release binaries..." >&2
cargo build --release --quiet --bin echocenter --bin echoload
server_bin=target/release/echocenter
load_bin=target/release/echoload

work=$(mktemp -d "${TMPDIR:-/tmp}/echocenter-bench2.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME [extra flags...]: sets $server_pid and $addr.
start_server() {
  local name=$1
  shift
  "$server_bin" --addr 127.0.0.1:0 --db "$work/$name.db" \
    --max-frames-per-second 100000 --max-log-bytes-per-second 1000000000 \
    --metrics-token bench "$@" >"$work/$name.out" 2>"$work/$name.err" &
  server_pid=$!
  for _ in $(seq 100); do
    addr=$(sed -n 's/^listening on //p' "$work/$name.out")
    [ -n "$addr" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $name did not start:" >&2
  cat "$work/$name.err" >&2
  exit 1
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

load() {
  "$load_bin" "$@" --addr "$addr" --server-pid "$server_pid" --metrics-token bench
}

start_server flood
echo "== flood: echoload flood --db $work/flood.db --agents 1 --lines 230000 --line-bytes 4000" >&2
flood=$(load flood --db "$work/flood.db" --agents 1 --lines 230000 --line-bytes 4000)
stop_server

start_server search --max-log-rows-per-agent 0 --max-log-bytes-per-agent 0
echo "== search: fill with echoload flood --agents 4 --lines 35000 --settle 1, then echoload search --searchers 7" >&2
fill=$(load flood --db "$work/search.db" --agents 4 --lines 35000 --line-bytes 4000 --settle 1)
search=$(load search --searchers 7 --duration 10)
stop_server

python3 - "$flood" "$fill" "$search" <<EOF
import json, sys
flood, fill, search = (json.loads(a) for a in sys.argv[1:4])
print()
print("Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); SQLite on $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2 {print $2}'); release build, --sync full.")
print()
print("Flood with retention on (defaults: 30 d, 100,000 rows / 64 MiB per agent): %d lines of %d bytes = %.0f MiB of content (%.2f h at the default 256 KiB/s) in %.0f s; database + WAL %.1f MiB before, **%.1f MiB at the peak**, %.1f + %.1f MiB right after, **%.1f + %.1f MiB** after %.0f s (the pruner's minute)." % (
    flood["sent"], flood["line_bytes"], flood["content_mib"], flood["hours_at_default_sender_limits"], flood["flood_s"],
    flood["db_mib_before"], flood["db_mib_peak"], flood["db_mib_after_flood"]["main"], flood["db_mib_after_flood"]["wal"],
    flood["db_mib_settled"]["main"], flood["db_mib_settled"]["wal"], flood["settle_s"]))
if flood.get("errors"):
    print("Errors to the agent: %s" % flood["errors"])
print()
q, s = search["quiet"], search["searching"]
def l(d):
    return "p50 %.2f / p99 %.2f / max %.1f ms (n=%d)" % (d["p50_ms"], d["p99_ms"], d["max_ms"], d["n"])
print("Search: a log of %.0f MiB content (budgets off); %d searchers ran %.1f searches/s." % (fill["content_mib"], search["searchers"], search["searches_per_s"]))
print()
print("| agent authentication | alone | while %d threads search | p99 ratio |" % search["searchers"])
print("| --- | --- | --- | --- |")
r = search["p99_ratio_searching_to_quiet"]
print("| WebSocket handshake (token lookup) | %s | %s | %s |" % (l(q["ws_auth"]), l(s["ws_auth"]), r["ws_auth"]))
print("| REST GET /api/users/me | %s | %s | %s |" % (l(q["rest_auth"]), l(s["rest_auth"]), r["rest_auth"]))
print()
print("| search | latency |")
print("| --- | --- |")
for k, v in search["search_latency"].items():
    print("| \`%s\` | %s |" % (k, l(v)))
print()
print("Raw: flood %s" % json.dumps(flood, sort_keys=True))
print("Raw: fill %s" % json.dumps(fill, sort_keys=True))
print("Raw: search %s" % json.dumps(search, sort_keys=True))
EOF
