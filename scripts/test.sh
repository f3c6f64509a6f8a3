#!/usr/bin/env bash
# The whole test suite, on a machine that has only the Rust toolchain and python3:
# makes a venv under target/ with the Python clients the tests drive (the guide's
# websocket-client), then runs every Rust test (unit + integration against the real binary).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
export ECHOCENTER_TEST_PYTHON="$PWD/$venv/bin/python"
cargo test --all-targets "$@"
