#!/usr/bin/env bash
# Builds one Lambda artifact per HTTP binary: target/lambda/<binary>/bootstrap.zip.
#
# Lambda's provided.al2023 has glibc 2.34, older than Debian 12's, so a plain release build
# from Debian may not run there. This script uses, in order of preference:
#   1. cargo-lambda (`cargo install cargo-lambda`; cross-compiles with zig), or
#   2. the static musl target (`rustup target add x86_64-unknown-linux-musl`).
set -euo pipefail
cd "$(dirname "$0")/.."
BINARIES=(events-api writing-api notifications-api collaboration-api chat-api client-sessions-api presence-api activity-api analytics-api)

if command -v cargo-lambda >/dev/null 2>&1; then
  for bin in "${BINARIES[@]}"; do
    cargo lambda build --release --bin "$bin" --output-format zip
  done
  exit 0
fi

target=x86_64-unknown-linux-musl
if ! rustup target list --installed 2>/dev/null | grep -q "$target"; then
  echo "install cargo-lambda or run: rustup target add $target" >&2
  exit 1
fi
cargo build --release --target "$target" $(printf -- '--bin %s ' "${BINARIES[@]}")
for bin in "${BINARIES[@]}"; do
  out="target/lambda/$bin"
  mkdir -p "$out"
  cp "target/$target/release/$bin" "$out/bootstrap"
  (cd "$out" && rm -f bootstrap.zip && zip -q bootstrap.zip bootstrap)
  echo "built $out/bootstrap.zip"
done
