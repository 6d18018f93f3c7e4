#!/usr/bin/env bash
# Peer-to-peer benchmark: for N = 1, 2, 4, 8 nodes (or SHOAL_P2P_BENCH_NODES="..."), fresh
# shoal-snapshotter nodes, each in its own network namespace with its own containerd, start the
# same lazily pulled eStargz image at the same moment, the registry behind a 100 Mbit/s tc link.
# Prints registry bytes, bytes the nodes got from each other, and the median and slowest time
# from the start of the pull to the container's first output. Needs root (namespaces, FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-p2p: run as root (network namespaces, FUSE, containerd)" >&2
  exit 1
fi
scripts/install-deps.sh >/dev/null
export SHOAL_P2P_BENCH_NODES=${SHOAL_P2P_BENCH_NODES:-1 2 4 8}
cargo build --quiet --workspace --bins
# The harness of the end-to-end suite does the set-up; the benchmark is built into it only with
# the `bench` feature.
out=$(CI=true cargo test --quiet -p shoal-integration --features bench --test integration -- \
  p2p::bench --nocapture --test-threads=1 2>&1) || {
  echo "$out" | tail -50 >&2
  echo "bench-p2p: failed" >&2
  exit 1
}
echo "$out" | sed -n 's/^bench-p2p: //p'
