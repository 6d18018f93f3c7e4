#!/bin/sh
# What the `shoal` pod (deploy/kubernetes/shoal.yaml) does to its node, idempotently; a step
# that fails exits non-zero, leaving what it could not change as it was.
#
#   shoal-node-setup              the init container: steps 2 to 6
#   shoal-node-setup containerd   the `containerd-config` container: step 1, once the daemon
#                                 answers. Not before: with containerd's CRI pulling through
#                                 Shoal, the daemon's own container could not be created.
#   shoal-node-setup mode         prints where the daemon runs on this node: `host` (a systemd
#                                 unit of the host's) or `pod` (the DaemonSet's container)
#
# 1. containerd's config: Shoal's settings merged into the existing file (`shoal node-setup
#    containerd-config`: other settings and comments kept, a backup beside it), and containerd
#    restarted only when the file changed. A file that does not parse is refused untouched.
# 2. The node's peer certificate, issued from the cluster's peer CA (when one is mounted).
# 3. The daemon's config: the ConfigMap's template with @NODE_IP@ replaced, checked.
# 4. The `shoal` CLI on the host (SHOAL_HOST_BIN_DIR), for `shoal status` on the node.
# 5. The image filesystem kubelet measures: containerd's CRI names
#    <containerd root>/io.containerd.snapshotter.v1.shoal, which a proxy snapshotter never
#    creates; without it kubelet's image GC and imagefs eviction fail to stat it. A symlink
#    to Shoal's root makes kubelet measure the disk the chunk cache and snapshots are on.
# 6. On a host that runs systemd: the daemon and the fd holder as the host's own units, so
#    that after a reboot they start before containerd (a pod-hosted daemon could not: its
#    container needs a snapshot from the daemon itself). The binaries go to
#    SHOAL_HOST_BIN_DIR, the units to SHOAL_UNIT_DIR; the daemon's unit is restarted (its
#    mounts carried over) only when its binary, unit or config changed, the holder's never.
#
# Environment (the DaemonSet sets them; the defaults are the host paths as the pod sees them):
#   SHOAL_SOCKET            the daemon's socket step 1 waits for (/run/shoal/shoal.sock;
#                           empty: no wait)
#   CONTAINERD_CONFIG       containerd's config file       (/host/etc/containerd/config.toml)
#   CONTAINERD_CONFIG_VERSION  version for a missing file  (asked of the host's containerd)
#   RESTART_CONTAINERD      shell command that restarts it (nsenter into PID 1: systemctl
#                           restart containerd; the pod runs with hostPID)
#   SHOAL_CONFIG_TEMPLATE   the ConfigMap's file           (/etc/shoal-template/config.toml)
#   SHOAL_CONFIG            where the daemon reads it      (/etc/shoal/config.toml)
#   NODE_IP                 this node's address (the downward API's status.hostIP)
#   PEER_CA_DIR, PEER_TLS_DIR  the CA Secret, the node's certificate (/etc/shoal-ca, /etc/shoal-tls)
#   SHOAL_HOST_BIN_DIR      where to put the CLI on the host (unset: not installed)
#   CONTAINERD_ROOT         containerd's root as the pod sees it (/host/var/lib/containerd;
#                           unset or absent: step 5 is skipped)
#   SHOAL_ROOT_ON_HOST      Shoal's root as the host sees it (/var/lib/shoal)
#   SHOAL_DAEMON            where the daemon runs: auto (host when the host runs systemd),
#                           host or pod (auto)
#   HOST_ROOT               the host's root file system as the pod sees it (/proc/1/root,
#                           with hostPID), where `auto` looks for /run/systemd/system
#   SHOAL_UNIT_DIR          the host's systemd unit directory (/host/etc/systemd/system)
#   SHOAL_BIN_DIR_ON_HOST   SHOAL_HOST_BIN_DIR as the host sees it (/opt/shoal/bin)
#   HOST_SYSTEMCTL          the host's systemctl (nsenter into PID 1: systemctl)
set -eu
# busybox's sh runs its own applets before PATH: util-linux's are named by path.

log() { echo "shoal-node-setup: $*"; }
share=/usr/local/share/shoal
containerd_config="${CONTAINERD_CONFIG:-/host/etc/containerd/config.toml}"
restart="${RESTART_CONTAINERD:-/usr/bin/nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd}"
template="${SHOAL_CONFIG_TEMPLATE:-/etc/shoal-template/config.toml}"
config="${SHOAL_CONFIG:-/etc/shoal/config.toml}"
ca_dir="${PEER_CA_DIR:-/etc/shoal-ca}"
tls_dir="${PEER_TLS_DIR:-/etc/shoal-tls}"
host_systemctl="${HOST_SYSTEMCTL:-/usr/bin/nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl}"

daemon_mode() {
  case "${SHOAL_DAEMON:-auto}" in
    host | pod) echo "$SHOAL_DAEMON" ;;
    auto) if [ -d "${HOST_ROOT:-/proc/1/root}/run/systemd/system" ]; then echo host; else echo pod; fi ;;
    *) log "SHOAL_DAEMON must be auto, host or pod, not $SHOAL_DAEMON" >&2; exit 2 ;;
  esac
}

# Puts file $1 at $2 by a rename when it differs (a running program keeps its old file);
# says whether it changed by its status.
install_changed() {
  if cmp -s "$1" "$2"; then
    return 1
  fi
  mkdir -p "$(dirname "$2")"
  cp "$1" "$2.shoal-new"
  chmod "$3" "$2.shoal-new"
  mv -f "$2.shoal-new" "$2"
}

if [ "${1:-}" = mode ]; then
  daemon_mode
  exit 0
fi
mode="$(daemon_mode)"

if [ "${1:-}" = containerd ]; then
  socket="${SHOAL_SOCKET-/run/shoal/shoal.sock}"
  if [ -n "$socket" ]; then
    until shoal --socket "$socket" status >/dev/null 2>&1; do
      log "waiting for the daemon at $socket"
      sleep 2
    done
  fi
  # 1. containerd
  version="${CONTAINERD_CONFIG_VERSION:-}"
  if [ -z "$version" ] && [ ! -s "$containerd_config" ]; then
    # Only a missing file needs it: containerd 1.x reads version 2, 2.x version 3.
    major="$(/usr/bin/nsenter --target 1 --mount -- containerd --version | sed -n 's/.* v\{0,1\}\([0-9]\{1,\}\)\..*/\1/p')"
    case "$major" in
      1) version=2 ;;
      2) version=3 ;;
      *) log "cannot tell the host containerd's version ($major); set CONTAINERD_CONFIG_VERSION" >&2; exit 1 ;;
    esac
  fi
  merged="$(shoal node-setup containerd-config --file "$containerd_config" \
    --snippet "$share/containerd-config.toml" --snippet "$share/containerd-config-v3.toml" \
    ${version:+--default-version "$version"})"
  log "$merged"
  case "$merged" in
    unchanged:*) log "containerd keeps running" ;;
    *)
      log "restarting containerd: $restart"
      eval "$restart"
      ;;
  esac
  exit 0
fi

# 2. the peer certificate: IP SAN = the node's address, server and client auth, one year,
# a new one at every pod start.
if [ -f "$ca_dir/ca.pem" ] && [ -f "$ca_dir/ca.key" ]; then
  mkdir -p "$tls_dir"
  cd "$tls_dir"
  printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
    "${NODE_IP:?NODE_IP is not set}" >node.ext
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout tls.key -out node.csr -subj "/CN=shoal node $NODE_IP" 2>/dev/null
  openssl x509 -req -in node.csr -CA "$ca_dir/ca.pem" -CAkey "$ca_dir/ca.key" \
    -CAcreateserial -CAserial /tmp/ca.srl -days 365 -extfile node.ext -out tls.crt 2>/dev/null
  cp "$ca_dir/ca.pem" ca.pem
  rm -f node.csr node.ext
  chmod 0400 tls.key
  cd /
  log "peer certificate issued for $NODE_IP"
fi

# 3. the daemon's config (checked after the certificate it names exists)
restart_daemon=false
if [ -f "$template" ]; then
  mkdir -p "$(dirname "$config")"
  sed "s/@NODE_IP@/${NODE_IP:?NODE_IP is not set (the downward API's status.hostIP)}/g" \
    "$template" >"$config.new"
  shoal-snapshotter --check-config "$config.new" >/dev/null
  if install_changed "$config.new" "$config" 0644; then
    restart_daemon=true
    log "config written to $config"
  fi
  rm -f "$config.new"
fi

# 4. the CLI on the host (and, when the host runs the daemon, the daemon and the holder),
# replaced by a rename only when it differs
if [ -n "${SHOAL_HOST_BIN_DIR:-}" ]; then
  binaries=shoal
  [ "$mode" = host ] && binaries="shoal shoal-snapshotter shoal-fdholder"
  for binary in $binaries; do
    if install_changed "/usr/local/bin/$binary" "$SHOAL_HOST_BIN_DIR/$binary" 0755; then
      log "installed $binary ($(shoal --version)) as $SHOAL_HOST_BIN_DIR/$binary"
      [ "$binary" = shoal-snapshotter ] && restart_daemon=true
    fi
  done
fi
# 5. kubelet's image filesystem
containerd_root="${CONTAINERD_ROOT:-/host/var/lib/containerd}"
if [ -d "$containerd_root" ]; then
  imagefs="$containerd_root/io.containerd.snapshotter.v1.shoal"
  if [ ! -e "$imagefs" ] && [ ! -L "$imagefs" ]; then
    ln -s "${SHOAL_ROOT_ON_HOST:-/var/lib/shoal}" "$imagefs"
    log "kubelet's image filesystem $imagefs now points at ${SHOAL_ROOT_ON_HOST:-/var/lib/shoal}"
  fi
fi
# 6. the host's units
if [ "$mode" = host ]; then
  unit_dir="${SHOAL_UNIT_DIR:-/host/etc/systemd/system}"
  bin_on_host="${SHOAL_BIN_DIR_ON_HOST:-/opt/shoal/bin}"
  [ -n "${SHOAL_HOST_BIN_DIR:-}" ] || { log "SHOAL_HOST_BIN_DIR is not set: no binaries for the host's units" >&2; exit 1; }
  reload=false
  for unit in shoal-fdholder shoal-snapshotter; do
    # The image carries no README: the units point at the project's.
    sed -e "s|@BINDIR@|$bin_on_host|g" -e '/^Documentation=/d' \
      "$share/$unit.service" >"/tmp/$unit.service"
    if install_changed "/tmp/$unit.service" "$unit_dir/$unit.service" 0644; then
      reload=true
      [ "$unit" = shoal-snapshotter ] && restart_daemon=true
      log "unit $unit.service written to $unit_dir"
    fi
    rm -f "/tmp/$unit.service"
  done
  if $reload; then
    $host_systemctl daemon-reload
  fi
  $host_systemctl enable shoal-fdholder.service shoal-snapshotter.service
  # The holder is only started, never restarted: it holds the lazy mounts' connections (a
  # new holder binary takes over at the next boot).
  $host_systemctl start shoal-fdholder.service
  if $restart_daemon; then
    # A restart carries the lazy mounts over to the new daemon (README "Restarts").
    log "restarting shoal-snapshotter.service on the host"
    $host_systemctl restart shoal-snapshotter.service
  else
    $host_systemctl start shoal-snapshotter.service
  fi
  log "the host runs the daemon: shoal-snapshotter.service"
fi
log "done"
