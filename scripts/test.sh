#!/usr/bin/env bash
# The whole test suite, on a machine that has only the Rust toolchain and python3:
# makes a venv under target/ with the Python clients the tests drive (the guide's
# websocket-client), then runs every Rust test (unit + integration against the real binary)
# on SQLite, and runs the integration tests again on PostgreSQL inside a throw-away cluster
# (pg_virtualenv, from Debian's postgresql package) when PostgreSQL is installed. Without it
# the PostgreSQL run is skipped with a line saying so; ECHOCENTER_REQUIRE_POSTGRES=1 (CI)
# makes that skip a failure. Arguments go to both `cargo test` runs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
export ECHOCENTER_TEST_PYTHON="$PWD/$venv/bin/python"

failed=0
echo "== tests on SQLite"
start=$SECONDS
cargo test --no-fail-fast --all-targets "$@" || failed=1
echo "== SQLite run: $((SECONDS - start)) s"

if command -v pg_virtualenv >/dev/null 2>&1; then
  echo "== tests on PostgreSQL (a throw-away cluster from pg_virtualenv; each test server gets a database of its own)"
  start=$SECONDS
  # fsync=off: the cluster is thrown away at the end, and the tests are about our server,
  # not about PostgreSQL's durability. Unit tests do not touch the database: not run twice.
  pg_virtualenv -o fsync=off -o max_connections=300 \
    env ECHOCENTER_TEST_DB=postgres cargo test --no-fail-fast --test '*' "$@" || failed=1
  echo "== PostgreSQL run: $((SECONDS - start)) s"
else
  echo "PostgreSQL suite SKIPPED: pg_virtualenv not found (apt-get install postgresql)"
  if [ "${ECHOCENTER_REQUIRE_POSTGRES:-}" = 1 ]; then
    echo "ECHOCENTER_REQUIRE_POSTGRES=1: a skipped PostgreSQL suite is a failure" >&2
    failed=1
  fi
fi
exit "$failed"
