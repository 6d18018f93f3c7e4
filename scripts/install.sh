#!/usr/bin/env bash
# Builds Shoal and installs it as a service: binaries in /usr/local/bin, the example config as
# /etc/shoal/config.toml (kept if present), and the systemd unit. Prints the containerd snippet.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bins
install -m 0755 target/release/shoal-snapshotter target/release/shoal /usr/local/bin/
install -d -m 0755 /etc/shoal
[ -f /etc/shoal/config.toml ] || install -m 0644 config/example.toml /etc/shoal/config.toml
install -m 0644 scripts/shoal-snapshotter.service /etc/systemd/system/shoal-snapshotter.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now shoal-snapshotter
  echo "install: shoal-snapshotter is running; check with: shoal status"
else
  echo "install: no systemd here; start the daemon with: shoal-snapshotter --config /etc/shoal/config.toml"
fi
echo "install: add this to /etc/containerd/config.toml and restart containerd:"
cat scripts/containerd-shoal.toml
