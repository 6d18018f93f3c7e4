#!/bin/sh
# The `shoal-fdholder` DaemonSet's command (deploy/kubernetes/shoal.yaml): the fd holder that
# keeps the lazy mounts' FUSE connections while the pod-hosted daemon restarts. On a host that
# runs systemd the holder is the host's unit (`shoal-node-setup mode` says `host`), and a
# second one must not take its socket: this container then only stays up.
#
# Environment:
#   SHOAL_DAEMON        auto, host or pod, as for shoal-node-setup (auto)
#   HOLDER_SOCKET       the holder's socket (/run/shoal/fdholder.sock)
set -eu

if [ "$(shoal-node-setup mode)" = host ]; then
  echo "shoal-run-holder: the host runs the holder (shoal-fdholder.service); following it"
  trap 'exit 0' TERM INT
  while :; do
    sleep 3600 &
    wait $!
  done
fi
exec shoal-fdholder --socket "${HOLDER_SOCKET:-/run/shoal/fdholder.sock}" --idle-exit-secs 0
