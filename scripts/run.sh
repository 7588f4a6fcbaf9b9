#!/usr/bin/env bash
# Builds and runs a single-member Kord server: client gRPC on 127.0.0.1:7379, HTTP on
# 127.0.0.1:7381, data in ./kord-data. Extra arguments go to `kord` (see `kord --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/deps.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kord/target}"
cargo build --manifest-path "$root/Cargo.toml" --release --locked -p kord-server -p kord-client --bins
echo "kord: kordctl is at $CARGO_TARGET_DIR/release/kordctl" >&2
exec "$CARGO_TARGET_DIR/release/kord" "$@"
