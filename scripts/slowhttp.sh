#!/usr/bin/env bash
# The front door against a tool we did not write: slowhttptest (Debian package) in its
# slow-headers, slow-body and slow-read modes, 30 s each, 1000 connections, against a server
# on 127.0.0.1 (loopback only; every run is bounded by -l). While each attack runs, a
# probe from another address (curl --interface 127.0.0.2) asks GET /api/ping every half
# second with a 2 s limit; a mode fails if any probe goes unanswered. The server runs with
# --trusted-proxies none, so the attacker (127.0.0.1) is held to the per-address cap.
# Installs slowhttptest and curl if missing. The last line is "slowhttptest: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v slowhttptest >/dev/null || need+=(slowhttptest)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
    || { echo "slowhttp: cannot install ${need[*]}" >&2; echo "slowhttptest: 0 passed, 1 failed"; exit 1; }
fi

bin=${ECHOCENTER_BIN:-}
if [ -z "$bin" ]; then
  cargo build --quiet --bin echocenter || { echo "slowhttptest: 0 passed, 1 failed"; exit 1; }
  bin=target/debug/echocenter
fi
seconds=${SLOWHTTP_SECONDS:-30}
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$bin" --addr 127.0.0.1:0 --db "$work/e.db" --trusted-proxies none --log warn >"$work/out" 2>"$work/err" &
pid=$!
addr=
for _ in $(seq 200); do
  addr=$(sed -n 's/^listening on //p' "$work/out")
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { cat "$work/err" >&2; echo "slowhttptest: 0 passed, 1 failed"; exit 1; }

# Probes GET /api/ping until the file $1 appears; prints "answered missed".
probe() {
  local ok=0 missed=0
  while [ ! -e "$1" ]; do
    if curl -fsS --interface 127.0.0.2 --max-time 2 -o /dev/null "http://$addr/api/ping" 2>/dev/null; then
      ok=$((ok + 1))
    else
      missed=$((missed + 1))
    fi
    sleep 0.5
  done
  echo "$ok $missed"
}

passed=0 failed=0
run_mode() {
  local name=$1; shift
  local stop="$work/stop-$name"
  probe "$stop" >"$work/probe-$name" &
  local prober=$!
  timeout $((seconds + 30)) slowhttptest "$@" -c 1000 -r 200 -l "$seconds" -p 2 >"$work/$name.log" 2>&1
  touch "$stop"
  wait "$prober"
  read -r ok missed <"$work/probe-$name"
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "slowhttp: $name: the server died"; failed=$((failed + 1)); return
  fi
  if [ "${missed:-1}" -eq 0 ] && [ "${ok:-0}" -gt 0 ]; then
    echo "slowhttp: $name: /api/ping answered all $ok probes"; passed=$((passed + 1))
  else
    echo "slowhttp: $name: /api/ping missed $missed of $((ok + missed)) probes"; failed=$((failed + 1))
    tail -5 "$work/$name.log"
  fi
}

run_mode slow-headers -H -i 5 -u "http://$addr/api/ping"
run_mode slow-body -B -i 5 -s 8192 -u "http://$addr/api/auth/login"
run_mode slow-read -X -k 3 -n 5 -w 10 -y 20 -z 32 -u "http://$addr/"
echo "slowhttptest: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
