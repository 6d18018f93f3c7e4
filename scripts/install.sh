#!/usr/bin/env bash
# Installs Shoal as a service, or removes it.
#
#   scripts/install.sh [--prefix DIR] [--destdir DIR] [--from DIR]
#   scripts/install.sh --uninstall [--prefix DIR] [--destdir DIR]
#
# Installs stripped binaries in PREFIX/bin (default /usr/local) with their debug info split
# off beside them (PREFIX/bin/.debug/, where gdb looks), the README as PREFIX/share/doc/shoal,
# the example config as /etc/shoal/config.toml (kept if present), and a systemd unit only on a
# host that runs systemd. Prints the containerd snippet.
#   --from DIR     install the binaries already built in DIR instead of building them
#   --destdir DIR  stage everything under DIR (as for a package); nothing is started
#   --uninstall    stop the service and remove what an install wrote, except the config and
#                  the daemon's data, which are named so they can be removed by hand
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
destdir=
from=
uninstall=false
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --destdir) destdir="${2:?--destdir needs a directory}"; shift 2 ;;
    --from) from="${2:?--from needs a directory}"; shift 2 ;;
    --uninstall) uninstall=true; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in
  /*) ;;
  *) echo "install: --prefix must be an absolute path, not $prefix" >&2; exit 2 ;;
esac

binaries=(shoal-snapshotter shoal shoal-fdholder)
bindir="$destdir$prefix/bin"
debugdir="$bindir/.debug"
docdir="$destdir$prefix/share/doc/shoal"
etcdir="$destdir/etc/shoal"
unit_name=shoal-snapshotter.service
# Keeps the lazy mounts' FUSE connections while the daemon restarts; never restarted with it.
holder_unit=shoal-fdholder.service
unitdir="$destdir/etc/systemd/system"
# Only a live systemd takes a unit; a staged install never starts anything.
with_systemd=false
if [ -z "$destdir" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  with_systemd=true
fi

if $uninstall; then
  if $with_systemd && [ -f "$unitdir/$unit_name" ]; then
    # The one stop that ends the lazy mounts, then the holder that kept them.
    "$bindir/shoal-snapshotter" --shutdown --config "$etcdir/config.toml" || true
    systemctl disable --now "$unit_name" "$holder_unit" || true
  fi
  rm -f "$unitdir/$unit_name" "$unitdir/$holder_unit"
  $with_systemd && systemctl daemon-reload
  for binary in "${binaries[@]}"; do
    rm -f "$bindir/$binary" "$debugdir/$binary.debug"
  done
  rmdir "$debugdir" 2>/dev/null || true
  rm -rf "$docdir"
  echo "install: removed Shoal from $destdir$prefix"
  echo "install: kept the config $etcdir/config.toml and the daemon's data (its root, by" \
    "default $destdir/var/lib/shoal); remove them by hand if they should go too"
  echo "install: remove the proxy_plugins.shoal entry from containerd's config and restart it"
  exit 0
fi

if [ -z "$from" ]; then
  scripts/install-deps.sh
  cargo build --release --bins
  from=target/release
fi
for binary in "${binaries[@]}"; do
  [ -x "$from/$binary" ] || { echo "install: no $from/$binary (build it first)" >&2; exit 1; }
done

install -d -m 0755 "$bindir" "$debugdir" "$docdir"
for binary in "${binaries[@]}"; do
  # Debug info goes to its own file, linked from the binary by name and checksum, so the
  # binary stays small and a backtrace can still be symbolized.
  objcopy --only-keep-debug "$from/$binary" "$debugdir/$binary.debug"
  chmod 0644 "$debugdir/$binary.debug"
  staged="$(mktemp "$bindir/.$binary.XXXXXX")"
  objcopy --strip-debug --strip-unneeded \
    --add-gnu-debuglink="$debugdir/$binary.debug" "$from/$binary" "$staged"
  chmod 0755 "$staged"
  # A rename, so a running daemon keeps its old file and a new start gets the new one.
  mv -f "$staged" "$bindir/$binary"
done
install -m 0644 README.md "$docdir/README.md"
install -d -m 0755 "$etcdir"
[ -f "$etcdir/config.toml" ] || install -m 0644 config/example.toml "$etcdir/config.toml"
"$bindir/shoal-snapshotter" --check-config "$etcdir/config.toml" >/dev/null

if $with_systemd || [ -n "$destdir" ]; then
  install -d -m 0755 "$unitdir"
  sed -e "s|@BINDIR@|$prefix/bin|g" -e "s|@DOCDIR@|$prefix/share/doc/shoal|g" \
    scripts/shoal-snapshotter.service >"$unitdir/$unit_name"
  sed -e "s|@BINDIR@|$prefix/bin|g" -e "s|@DOCDIR@|$prefix/share/doc/shoal|g" \
    scripts/shoal-fdholder.service >"$unitdir/$holder_unit"
  chmod 0644 "$unitdir/$unit_name" "$unitdir/$holder_unit"
fi
if $with_systemd; then
  systemctl daemon-reload
  systemctl enable --now "$holder_unit" "$unit_name"
  echo "install: shoal-snapshotter is running; check with: shoal status"
elif [ -z "$destdir" ]; then
  echo "install: no systemd here, so no unit was written; start the daemon with:"
  echo "  $prefix/bin/shoal-snapshotter --config /etc/shoal/config.toml"
fi
echo "install: $("$bindir/shoal" --version) in $bindir"
echo "install: add this to /etc/containerd/config.toml and restart containerd:"
cat scripts/containerd-shoal.toml
