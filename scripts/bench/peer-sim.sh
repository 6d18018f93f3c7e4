#!/usr/bin/env bash
# The peer protocol's simulation at 10, 100 and 1,000 nodes (or the sizes given) starting one
# 300 MiB image together: builds the `peer_sim` example (release, feature `sim`), runs it, prints
# the table and writes it to bench-results/peer-sim-<commit>.md. Deterministic: the same commit
# and seed give the same table. Usage: scripts/bench/peer-sim.sh [--seed N] [NODES...]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p shoal-fetcher --features sim --example peer_sim
commit="$(git rev-parse --short HEAD)"
if ! git diff --quiet HEAD -- fetcher; then
  commit="$commit-dirty"
fi
mkdir -p bench-results
out="bench-results/peer-sim-$commit.md"
exec "${CARGO_TARGET_DIR:-target}/release/examples/peer_sim" --out "$out" "$@"
