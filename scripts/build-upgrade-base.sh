#!/usr/bin/env bash
# Builds the daemon and fd holder of the oldest Shoal the current one promises to take running
# mounts over from (UPGRADE_BASE below), into target/upgrade-base/, for the integration test
# of an upgrade (`handover::an_upgrade_...`). It builds in a target directory of its own,
# removed afterwards: sharing this checkout's lets cargo take the old release's crates for the
# current ones (a path dependency's artifacts are named without its path).
#
# Raise UPGRADE_BASE only when a release drops compatibility with it, and say so in the README
# ("Restarts, crashes and upgrades").
set -euo pipefail
cd "$(dirname "$0")/.."

# The first release with the fd holder's protocol 1 and persisted INIT records.
UPGRADE_BASE=f8ef7f3f6db80572d09010e8eabf0e78d2bdd625
out=target/upgrade-base

if [ -x "$out/shoal-snapshotter" ] && [ "$(cat "$out/commit" 2>/dev/null)" = "$UPGRADE_BASE" ]; then
  echo "upgrade base: $UPGRADE_BASE already built in $out"
  exit 0
fi
if ! git cat-file -e "$UPGRADE_BASE^{commit}" 2>/dev/null; then
  echo "upgrade base: commit $UPGRADE_BASE is not in this clone (a shallow clone?);" \
    "fetch it (git fetch --unshallow) to run the upgrade test" >&2
  exit 1
fi

build=$(pwd)/target/upgrade-base-build
source=$(mktemp -d)
trap 'git worktree remove --force "$source" >/dev/null 2>&1 || rm -rf "$source"; rm -rf "$build"' EXIT
git worktree add --quiet --detach "$source" "$UPGRADE_BASE"
(cd "$source" && CARGO_TARGET_DIR="$build" cargo build --quiet -p shoal-cmd \
  --bin shoal-snapshotter --bin shoal-fdholder)
rm -rf "$out"
mkdir -p "$out"
cp "$build/debug/shoal-snapshotter" "$build/debug/shoal-fdholder" "$out/"
echo "$UPGRADE_BASE" >"$out/commit"
echo "upgrade base: built $("$out/shoal-snapshotter" --version) in $out"
