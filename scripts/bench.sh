#!/usr/bin/env bash
# Load benchmark (issue #5). Builds release, starts a server on a temporary database, drives it
# with `echoload` (src/bin/echoload/) at the sizes below, and prints a markdown table with the
# targets next to the results. Everything runs on 127.0.0.1; everything it starts is stopped and
# the temporary directory removed on exit. Takes about 4-5 minutes.
#
#   scripts/bench.sh                      # the standard run
#   BENCH_CONNECT=10000 scripts/bench.sh  # 10,000 idle agents (see the note printed at the end)
#
# Raw results (one JSON line per scenario) are kept if BENCH_KEEP=1, else only printed.
#
# PostgreSQL rows (issue #14): when pg_virtualenv is installed (Debian's postgresql), the
# script runs itself inside a throw-away cluster (default settings: fsync on, synchronous
# commit, like --sync full) and adds closed-loop and 5,000 rt/s runs on one PostgreSQL node
# and on two nodes with the humans on one and the agents on the other, a cross-node RTT run at
# 1,000 rt/s, and each node's and PostgreSQL's CPU per round trip. BENCH_PG=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${BENCH_PG:-1}" = 1 ] && [ -z "${PGHOST:-}" ] && command -v pg_virtualenv >/dev/null 2>&1; then
  exec pg_virtualenv -o max_connections=300 "$0" "$@"
fi
pg=0
if [ "${BENCH_PG:-1}" = 1 ] && [ -n "${PGHOST:-}" ]; then
  pg=1
fi

connect_n=${BENCH_CONNECT:-5000}
duration=${BENCH_DURATION:-10}
metrics_token="bench-metrics-$$"

echo "building release binaries..." >&2
cargo build --release --quiet --bin echocenter --bin echoload
server_bin=target/release/echocenter
load_bin=target/release/echoload

work=$(mktemp -d "${TMPDIR:-/tmp}/echocenter-bench.XXXXXX")
results="$work/results.jsonl"
server_pid=""
node_pids=()
cleanup() {
  for p in $server_pid "${node_pids[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then
    echo "kept $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every WebSocket connection costs the server a few file descriptors; take what we may.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# start_server NAME SYNC [extra flags...]: sets $server_pid and $addr. The database is
# $work/NAME.db unless $db is set (a postgres:// URL).
start_server() {
  local name=$1 sync=$2
  shift 2
  "$server_bin" --addr 127.0.0.1:0 --db "${db:-$work/$name.db}" --sync "$sync" \
    --max-frames-per-second 100000 --metrics-token "$metrics_token" "$@" \
    >"$work/$name.out" 2>"$work/$name.err" &
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

# CPU seconds (user + system) of one process, or of every process named postgres.
cpu_s() {
  local ticks
  if [ "$1" = postgres ]; then
    ticks=$(for p in $(pgrep -x postgres); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done | awk '{n += $1} END {print n + 0}')
  else
    ticks=$(awk '{print $14 + $15}' "/proc/$1/stat")
  fi
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}'
}

# A fresh PostgreSQL database in the pg_virtualenv cluster; prints its URL.
pg_database() {
  local name=$1
  psql -q -d postgres -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
  python3 -c 'import os, sys, urllib.parse as u
q = lambda s: u.quote(s, safe="")
print("postgres://%s:%s@%s:%s/%s?sslmode=disable" % (q(os.environ["PGUSER"]), q(os.environ.get("PGPASSWORD", "")), os.environ.get("PGHOST", "localhost"), os.environ.get("PGPORT", "5432"), sys.argv[1]))' "$name"
}

# run LABEL SCENARIO [args...]: one echoload run; its JSON line goes to $results with the
# label, and the CPU seconds each process of $watch (server pids, or "postgres") spent in it.
run() {
  local label=$1
  shift
  echo "== $label: echoload $*" >&2
  local line w before=() after=()
  local watched=(${watch:-$server_pid})
  for w in "${watched[@]}"; do before+=("$(cpu_s "$w")"); done
  line=$("$load_bin" "$@" --addr "$addr" --server-pid "$server_pid" \
    --metrics-token "$metrics_token" 2>>"$work/echoload.err") || true
  for w in "${watched[@]}"; do after+=("$(cpu_s "$w")"); done
  if [ -z "$line" ]; then
    line='{"error":"echoload printed nothing"}'
  fi
  local cpu="" i
  for i in "${!watched[@]}"; do
    cpu+="${cpu:+,}$(awk -v a="${after[$i]}" -v b="${before[$i]}" 'BEGIN {printf "%.2f", a - b}')"
  done
  printf '{"label":"%s","cpu_s":[%s],"run":%s}\n' "$label" "$cpu" "$line" >>"$results"
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)

extra=()
if [ "$connect_n" -gt 9000 ]; then
  extra=(--max-connections $((connect_n + 1000)))
fi
start_server full full "${extra[@]}"
run connect connect --agents "$connect_n" --duration "$duration"
run chat chat --rate 5000 --humans 16 --agents 50 --duration "$duration"
# The hot connection (issue #15): everything on one human's socket, and the Butler's fan-out.
run hot-open chat --rate 5000 --humans 1 --agents 200 --duration "$duration"
run butler butler --agents 200 --interval-ms 100 --duration "$duration"
run logs-200 logs --agents 200 --rate 10 --dashboards 3 --duration "$duration"
run logs-500 logs --agents 500 --rate 20 --dashboards 3 --duration "$duration"
run stream stream --rate 200 --chunks 10 --humans 8 --agents 20 --duration "$duration"
grep -E ' WARN | ERROR ' "$work/full.err" | grep -v 'bootstrap:' | head -20 >"$work/warnings" || true
stop_server

# The closed loops each get a fresh server, so the two durability modes start equal (a server
# that just held and dropped 5,000 connections is not the same starting point).
start_server closed-full full
run closed-full chat --closed-loop 256 --humans 32 --agents 50 --duration "$duration"
grep -E ' WARN | ERROR ' "$work/closed-full.err" | grep -v 'bootstrap:' | head -20 >>"$work/warnings" || true
stop_server

start_server hot-closed full
run hot-closed chat --closed-loop 32 --humans 1 --agents 200 --duration "$duration"
grep -E ' WARN | ERROR ' "$work/hot-closed.err" | grep -v 'bootstrap:' | head -20 >>"$work/warnings" || true
stop_server

start_server normal normal
run closed-normal chat --closed-loop 256 --humans 32 --agents 50 --duration "$duration"
grep -E ' WARN | ERROR ' "$work/normal.err" | grep -v 'bootstrap:' | head -20 >>"$work/warnings" || true
stop_server

if [ "$pg" = 1 ]; then
  # One SQLite node's numbers for the same shapes are the rows above (closed-full, chat).
  db=$(pg_database bench_one)
  start_server pg-one full
  watch="$server_pid postgres"
  run pg-one-closed chat --closed-loop 256 --humans 32 --agents 50 --duration "$duration"
  run pg-one-open chat --rate 5000 --humans 16 --agents 50 --duration "$duration"
  grep -E ' WARN | ERROR ' "$work/pg-one.err" | grep -v 'bootstrap:' | head -20 >>"$work/warnings" || true
  stop_server

  # Two nodes on one database: the humans on node A, the agents on node B, so every round
  # trip crosses the bus twice (instruction A -> B, answer B -> A).
  db=$(pg_database bench_two)
  start_server pg-node-b full --node-timeout 30s
  addr_b=$addr
  node_pids+=("$server_pid")
  pid_b=$server_pid
  start_server pg-node-a full --node-timeout 30s
  watch="$server_pid $pid_b postgres"
  run pg-two-closed chat --closed-loop 256 --humans 32 --agents 50 --duration "$duration" --agent-addr "$addr_b"
  run pg-two-open chat --rate 5000 --humans 16 --agents 50 --duration "$duration" --agent-addr "$addr_b"
  run pg-two-1000 chat --rate 1000 --humans 16 --agents 50 --duration "$duration" --agent-addr "$addr_b"
  grep -E ' WARN | ERROR ' "$work/pg-node-a.err" "$work/pg-node-b.err" | grep -v 'bootstrap:' | head -20 >>"$work/warnings" || true
  stop_server
  kill "$pid_b" 2>/dev/null || true
  wait "$pid_b" 2>/dev/null || true
  node_pids=()
  unset db watch
fi

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
fs=$(df -T "$work" | awk 'NR==2 {print $2}')

python3 - "$results" "$work/warnings" "$work/echoload.err" <<EOF
import json, sys

runs = {}
cpu_s = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[r["label"]] = r["run"]
    cpu_s[r["label"]] = r.get("cpu_s", [])

def g(d, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d

def lat(d):
    if not d or not d.get("n"):
        return "-"
    return "%.2f / %.2f / %.2f / %.1f" % (d["p50_ms"], d["p90_ms"], d["p99_ms"], d["max_ms"])

def verdict(ok):
    return "yes" if ok else "**no**"

def cpu(r):
    o = r.get("observed", {})
    parts = ", ".join("%s %.0f" % (k, v) for k, v in sorted(o.get("server_cpu_pct_by_thread", {}).items(), key=lambda kv: -kv[1]) if v >= 1)
    m = o.get("metrics", {})
    db = ""
    if m.get("db_commits"):
        db = "%.1f rows/commit, %.2f ms/commit, writer busy %.0f%%" % (m["db_rows_per_commit"], m["db_commit_ms_avg"], m["db_commit_busy_pct"])
    server = "%s%%" % o.get("server_cpu_pct", "-")
    if parts:
        server += " (%s)" % parts
    return server, "%s%%" % o.get("client_cpu_pct", "-"), db

print()
print("Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; database on $fs (temp dir); load average $load_start at start, $load_end at end.")
print("Server: release build, --sync full unless noted, --max-frames-per-second 100000. Client and server share the machine.")
print()
print("| scenario | load | result | latency p50 / p90 / p99 / max (ms) | target | met |")
print("| --- | --- | --- | --- | --- | --- |")

r = runs.get("connect", {})
if "error" in r:
    print("| connect | $connect_n idle agents | error: %s | - | <= 64 KiB/conn | **no** |" % r["error"])
elif r:
    kib = r.get("kib_per_conn")
    print("| connect | %d idle agents, held %ss | %d connected, %d failed, %d dropped; %.0f connects/s; RSS %s -> %s KiB, %s threads | - | <= 64 KiB RSS per idle connection: **%s KiB** | %s |" % (
        r["agents"], r["hold_s"], r["connected"], r["failed"], r["dropped_during_hold"], r["connects_per_s"],
        r.get("server_rss_before_kib"), r.get("server_rss_held_kib"), r.get("server_threads_held"), kib,
        verdict(kib is not None and kib <= 64 and r["failed"] == 0 and r["dropped_during_hold"] == 0)))
    m = r.get("memory_per_conn")
    if m:
        print("| connect, per connection | what each idle connection costs the server (smaps before/after) | stacks **%.1f KiB** resident (%.2f new %s KiB stack mappings), heap and other anonymous **%.1f KiB**, file/shared %.1f KiB (sum %.1f KiB); **%.2f threads**, %.2f memory maps | - | (breakdown, no target) | - |" % (
            m["stack_kib"], m["stack_mappings"], m["stack_size_kib"], m["heap_other_anon_kib"], m["file_shared_kib"], m["rss_kib"], m["threads"], m["maps"]))

# chat_row LABEL NAME TARGET [min_rt] [max_p99]: every chat-shaped run must lose and
# duplicate nothing; min_rt and max_p99 (ms) are its own target.
def chat_row(label, name, target, min_rt=None, max_p99=None):
    r = runs.get(label, {})
    if not r:
        return
    if "error" in r:
        print("| %s | - | error: %s | - | %s | **no** |" % (name, r["error"], target))
        return
    if r["scenario"] == "butler":
        load = "the Butler -> %d agents, one CHAT to each every %g ms (%d/s), %ss" % (r["agents"], r["interval_ms"], r["rate_offered"], r["duration_s"])
    elif r["mode"] == "open":
        load = "%d humans -> %d agents, %d rt/s offered, %ss" % (r["humans"], r["agents"], r["rate_offered"], r["duration_s"])
    else:
        load = "%d humans -> %d agents, %d in flight, %ss (%ss warm-up)" % (r["humans"], r["agents"], r["closed_loop"], r["duration_s"], r["warmup_s"])
    ok = r["lost"] == 0 and r["duplicated"] == 0
    if min_rt is not None:
        ok = ok and r["rt_per_s"] >= min_rt
    if max_p99 is not None:
        ok = ok and g(r, "latency", "p99_ms", default=1e9) <= max_p99
    back = "ack" if "ack" in r else "echo"
    res = "**%.0f rt/s**; sent %d, lost %d, dup %d; %s lost %d, dup %d" % (
        r["rt_per_s"], r["sent"], r["lost"], r["duplicated"], back, r[back]["lost"], r[back]["duplicated"])
    if r["mode"] == "open":
        res += "; client send lag max %.1f ms" % r["max_send_lag_ms"]
    if r.get("busiest_sender_thread_cpu_pct", 0) >= 80:
        res += "; client sender thread at %.0f%% CPU: the client may set the pace" % r["busiest_sender_thread_cpu_pct"]
    if r.get("errors"):
        res += "; errors %s" % r["errors"]
    print("| %s | %s | %s | %s | %s | %s |" % (name, load, res, lat(r.get("latency")), target, verdict(ok)))

chat_row("chat", "chat (open loop)", "p99 <= 10 ms, 0 lost, 0 dup", max_p99=10)
chat_row("hot-open", "chat, 5,000 rt/s offered from 1 human -> 200 agents", "p99 <= 10 ms, 0 lost, 0 dup", max_p99=10)
chat_row("butler", "Butler fan-out", "0 lost, p99 <= 10 ms", max_p99=10)
chat_row("closed-full", "chat closed loop, sync full", ">= 15,000 rt/s", min_rt=15000)
chat_row("hot-closed", "chat, closed loop, 1 human x 32 in flight -> 200 echoing agents", ">= 12,000 rt/s", min_rt=12000)
chat_row("closed-normal", "chat closed loop, sync normal", ">= 15,000 rt/s", min_rt=15000)

def logs_row(label, target, p99_target):
    r = runs.get(label, {})
    if not r:
        return
    if "error" in r:
        print("| logs | - | error: %s | - | %s | **no** |" % (r["error"], target))
        return
    per = ", ".join("%d/%d" % (d["delivered"], d["sent"]) for d in r["per_dashboard"])
    load = "%d agents x %g/s -> %d dashboards, %ss" % (r["agents"], r["rate_per_agent"], r["dashboards"], r["duration_s"])
    res = "delivered/sent per dashboard %s; lost %d, dup %d; client send lag max %.1f ms" % (per, r["lost"], r["duplicated"], r["max_send_lag_ms"])
    if r.get("errors_to_agents"):
        res += "; errors %s" % r["errors_to_agents"]
    ok = r["lost"] == 0 and r["duplicated"] == 0 and (p99_target is None or g(r, "latency", "p99_ms", default=1e9) <= p99_target)
    print("| logs | %s | %s | %s | %s | %s |" % (load, res, lat(r.get("latency")), target, verdict(ok) if p99_target else ("yes" if ok else "**loss**")))

logs_row("logs-200", "0 loss, p99 <= 20 ms", 20)
logs_row("logs-500", "(no target; 0 loss expected)", None)

r = runs.get("stream", {})
if r and "error" not in r:
    load = "%d humans -> %d agents, %d streams/s x %d chunks, %ss" % (r["humans"], r["agents"], r["rate_offered"], r["chunks_per_stream"], r["duration_s"])
    res = "%d/%d streams complete, chunks %d/%d, order kept: %s (%d violations), lost %d, dup %d; stream p99 %.2f ms" % (
        r["answered"], r["sent"], r["chunks_received"], r["chunks_expected"], r["order_kept"], r["order_violations"], r["lost"], r["duplicated"], g(r, "stream_latency", "p99_ms", default=-1))
    print("| stream | %s | %s | chunk: %s | (no target; order kept, 0 lost) | %s |" % (load, res, lat(r.get("chunk_latency")), verdict(r["order_kept"] and r["lost"] == 0)))
elif r:
    print("| stream | - | error: %s | - | - | **no** |" % r["error"])

pg_rows = [
    ("pg-one-closed", "PostgreSQL, 1 node: closed loop, 256 in flight", ">= 50% of SQLite's closed loop", "closed-full"),
    ("pg-one-open", "PostgreSQL, 1 node: 5,000 rt/s offered", "0 lost, 0 dup", None),
    ("pg-two-closed", "PostgreSQL, 2 nodes (humans on A, agents on B): closed loop, 256 in flight", "0 lost, 0 dup", None),
    ("pg-two-open", "PostgreSQL, 2 nodes across: 5,000 rt/s offered", "0 lost, 0 dup", None),
    ("pg-two-1000", "PostgreSQL, 2 nodes across: 1,000 rt/s offered (cross-node RTT)", "p99 <= 20 ms, 0 lost, 0 dup", None),
]
if any(l in runs for l, *_ in pg_rows):
    print()
    print("PostgreSQL (issue #14; a pg_virtualenv cluster on the same machine, default settings: fsync on, synchronous commit):")
    print()
    print("| scenario | result | latency p50 / p90 / p99 / max (ms) | CPU per round trip: node A / node B / PostgreSQL (ms) | target | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, name, target, versus in pg_rows:
        r = runs.get(label)
        if not r:
            continue
        if "error" in r:
            print("| %s | error: %s | - | - | %s | **no** |" % (name, r["error"], target))
            continue
        ok = r["lost"] == 0 and r["duplicated"] == 0
        res = "**%.0f rt/s**; sent %d, lost %d, dup %d" % (r["rt_per_s"], r["sent"], r["lost"], r["duplicated"])
        if versus and versus in runs and "rt_per_s" in runs[versus]:
            share = r["rt_per_s"] / runs[versus]["rt_per_s"]
            res += "; **%.0f%%** of SQLite's %.0f" % (100 * share, runs[versus]["rt_per_s"])
            ok = ok and share >= 0.5
        if label == "pg-two-1000":
            ok = ok and g(r, "latency", "p99_ms", default=1e9) <= 20
        rts = r["rt_per_s"] * r["duration_s"]
        cpus = cpu_s.get(label, [])
        per = " / ".join("%.3f" % (1000 * c / rts) for c in cpus) if rts else "-"
        if len(cpus) == 2:
            per = per.replace(" / ", " / - / ", 1)
        print("| %s | %s | %s | %s | %s | %s |" % (name, res, lat(r.get("latency")), per, target, verdict(ok)))
    two = runs.get("pg-two-closed")
    cpus = cpu_s.get("pg-two-closed", [])
    if two and "rt_per_s" in two and len(cpus) == 3:
        rts = two["rt_per_s"] * two["duration_s"]
        node = (cpus[0] + cpus[1]) / rts  # CPU seconds all nodes spend per round trip
        pgc = cpus[2] / rts
        cores = int("$(nproc)")
        nodes4 = 4 * cores / node
        pg_cap = cores / pgc
        print()
        print("By that model (closed loop, every round trip crossing two nodes): the nodes spend %.3f ms of CPU per round trip between them, PostgreSQL %.3f ms. Four nodes of %d cores each could carry %.0f rt/s; a PostgreSQL of %d cores caps the cluster at %.0f rt/s, so 4 nodes would reach **~%.0f rt/s** (the smaller)." % (
            1000 * node, 1000 * pgc, cores, nodes4, cores, pg_cap, min(nodes4, pg_cap)))

print()
print("Where the time went (server CPU % of one core, by thread kind; client = echoload):")
print()
print("| scenario | server CPU | client CPU | database |")
print("| --- | --- | --- | --- |")
for label in ["connect", "chat", "hot-open", "butler", "closed-full", "hot-closed", "closed-normal", "logs-200", "logs-500", "stream"]:
    r = runs.get(label)
    if r and "error" not in r:
        s, c, db = cpu(r)
        print("| %s | %s | %s | %s |" % (label, s, c, db))

warnings = open(sys.argv[2]).read().strip()
if warnings:
    print()
    print("Server warnings/errors seen (first lines):")
    print()
    for w in warnings.splitlines():
        print("    " + w)
errs = [l for l in open(sys.argv[3]).read().splitlines() if "failed" in l or "error" in l.lower()]
if errs:
    print()
    print("echoload problems:")
    for e in errs[:10]:
        print("    " + e)
print()
print("Raw results, one JSON line per scenario:")
print()
for label, r in runs.items():
    print("    %s %s" % (label, json.dumps(r, sort_keys=True)))
EOF

cat <<EOF

10,000 idle agents: the server uses 2 threads and 1 file descriptor per WebSocket, so 10,000
connections need ~20,000 server threads (more memory maps than the default vm.max_map_count=65530
allows) and ~10,000 descriptors. As root, raise the limits, then rerun with BENCH_CONNECT:
    sysctl -w vm.max_map_count=262144 kernel.pid_max=4194304
    ulimit -n 65536        # hard limit too: see /etc/security/limits.conf or systemd LimitNOFILE
    BENCH_CONNECT=10000 scripts/bench.sh
(or just the connect scenario against a running server:
    target/release/echoload connect --agents 10000 --addr 127.0.0.1:PORT --server-pid PID)
EOF
