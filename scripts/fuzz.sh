#!/usr/bin/env bash
# Runs every cargo-fuzz target of the format parsers (eStargz footer and TOC, overlaybd ZFile and
# LSMT) for a bounded time each: `scripts/fuzz.sh [SECONDS]` (default 60). libFuzzer needs a
# nightly toolchain and cargo-fuzz; this script installs neither on its own beyond cargo-fuzz.
# Not part of the test command: fuzzing is open-ended, and CI time is for deterministic tests.
set -euo pipefail
cd "$(dirname "$0")/../formats/fuzz"
seconds=${1:-60}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target for ${seconds}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 |
    grep -E '^(#[0-9]+ +DONE|Done|==[0-9]+== ERROR|SUMMARY|artifact_prefix)' || true
  if ls "artifacts/$target"/crash-* "artifacts/$target"/oom-* "artifacts/$target"/timeout-* >/dev/null 2>&1; then
    echo "fuzz: $target left failing inputs in artifacts/$target" >&2
    exit 1
  fi
done
echo "== fuzz: every target ran clean"
