#!/usr/bin/env bash
# Runs every test of Shoal on a fresh Debian 12 machine: installs what the tests need, then
# formatting, lints, unit tests and the end-to-end suite (real containerd, registry, FUSE).
# Privileged tests skip loudly without root; under CI=true they must run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  scripts/install-deps.sh
else
  echo "test: not root: skipping package installation; privileged tests will skip" >&2
fi

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (the oldest release an upgrade takes mounts over from, in a target of its own)"
scripts/build-upgrade-base.sh
echo "== cargo build (binaries the end-to-end tests drive)"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace -- --test-threads="${SHOAL_TEST_THREADS:-4}"
echo "== all tests passed"
