#!/usr/bin/env bash
# A fully static release binary (glibc linked statically, SQLite bundled): copy it to any
# x86_64 Linux box and run it. Checks that ldd finds no dynamic dependencies and prints the size.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$target" --bin echocenter
bin="target/$target/release/echocenter"
if ldd "$bin" 2>&1 | grep -q '=>'; then
  echo "static-build: $bin has dynamic dependencies:" >&2
  ldd "$bin" >&2
  exit 1
fi
echo "static-build: $(ldd "$bin" 2>&1 | head -1 | sed 's/^[[:space:]]*//')"
"$bin" --version
echo "static-build: $bin is $(du -h "$bin" | cut -f1) ($(stat -c %s "$bin") bytes)"
