#!/usr/bin/env bash
# The dashboard's end-to-end tests in a real browser (tests/e2e/*.test.mjs), on a fresh
# machine: installs Debian's Chromium and Node.js if missing, the test's npm packages
# (playwright-core, from the committed lock file), and the Python venv the test agent needs;
# builds the server; runs the tests. Exits non-zero on failure. The last line of output is
# "N passed, N failed" (over every test of every file). Never downloads a browser of Playwright's own.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
fail() { echo "e2e: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq || fail "apt-get update failed"; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || fail "apt-get install $* failed"
}

[ -x /usr/bin/chromium ] || apt_install chromium
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
# playwright-core needs Node.js 20 or newer.
if ! command -v npm >/dev/null || [ "$(node_major)" -lt 20 ]; then apt_install nodejs npm; fi
[ "$(node_major)" -ge 20 ] || fail "Node.js 20 or newer is required (found $(node --version 2>/dev/null || echo none))"

(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error) || fail "npm ci in tests/e2e failed"

venv=target/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || fail "python3 -m venv failed (apt-get install python3-venv?)"
fi
if ! "$venv/bin/python" -c 'import websocket' 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt \
    || fail "pip install websocket-client failed"
fi

if [ -z "${ECHOCENTER_BIN:-}" ]; then
  cargo build || fail "cargo build failed"
  export ECHOCENTER_BIN="$PWD/target/debug/echocenter"
fi
export ECHOCENTER_TEST_PYTHON="${ECHOCENTER_TEST_PYTHON:-$PWD/$venv/bin/python}"

mkdir -p target/e2e
# One file at a time: each starts its own server and browser, and the machine may be small.
node --test --test-concurrency=1 --test-reporter=tap tests/e2e/dashboard.test.mjs tests/e2e/accounts.test.mjs tests/e2e/threads.test.mjs 2>&1 | tee target/e2e/output.tap
status=${PIPESTATUS[0]}

passed=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' target/e2e/output.tap | tail -1)
failed=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' target/e2e/output.tap | tail -1)
passed=${passed:-0}
failed=${failed:-0}
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
if [ "$passed" -eq 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && echo "screenshots: target/e2e/dashboard.png target/e2e/dashboard-mobile.png target/e2e/dashboard-users.png target/e2e/dashboard-threads.png target/e2e/dashboard-approvals.png"
echo "$passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
