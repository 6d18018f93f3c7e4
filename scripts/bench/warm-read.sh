#!/usr/bin/env bash
# Warm FUSE reads (sequential 1 MiB, random 4 KiB) and the cold 4 KiB miss, against local disk:
# builds the release binaries, then runs scripts/bench/warm_read.py with the given arguments
# (see its --help). Results go to bench-results/warm-read-<commit>.json. Run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
  echo "warm-read: run as root (mounts, drop_caches)" >&2
  exit 1
fi
cargo build --release --bins -q
exec python3 scripts/bench/warm_read.py --bin-dir "${CARGO_TARGET_DIR:-target}/release" "$@"
