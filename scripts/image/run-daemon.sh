#!/bin/sh
# The `shoal` container's command (deploy/kubernetes/shoal.yaml): runs shoal-snapshotter and
# starts it again, in this same container, whenever it exits or stops answering /health.
#
# Why here and not by kubelet: with containerd's CRI pulling through Shoal, a new container
# (which a kubelet restart or liveness failure makes) needs a snapshot from the very daemon it
# would replace, so it could never start. A daemon restarted in place keeps the container; the
# lazy mounts survive it (the fd holder keeps their FUSE connections, README "Restarts").
#
# On a host that runs systemd the daemon is the host's unit (`shoal-node-setup mode` says
# `host`; the init container installed and started it, README "Kubernetes"): this container
# then only stays up, so that the pod's readiness probe follows that daemon.
#
# Environment:
#   SHOAL_DAEMON        auto, host or pod, as for shoal-node-setup (auto)
#   SHOAL_CONFIG        the daemon's config (/etc/shoal/config.toml)
#   HOLDER_SOCKET       the fd holder's socket to wait for (/run/shoal/fdholder.sock): the
#                       holder must be the shoal-fdholder DaemonSet's, not one this container
#                       would start, which would die with it
#   HEALTH_URL          the daemon's /health (unset: no watchdog)
#   HEALTH_FAILURES     consecutive failed checks before a restart (6)
#   HEALTH_INTERVAL     seconds between checks (10)
#   START_GRACE         seconds a starting daemon has before failed checks count, unless it
#                       answered already (300: remounting many layers takes a while)
#   STOP_GRACE          seconds a daemon that stopped answering has to exit on SIGTERM before
#                       SIGKILL (30)
set -u

config="${SHOAL_CONFIG:-/etc/shoal/config.toml}"
holder="${HOLDER_SOCKET:-/run/shoal/fdholder.sock}"
failures_allowed="${HEALTH_FAILURES:-6}"
interval="${HEALTH_INTERVAL:-10}"
grace="${STOP_GRACE:-30}"
start_grace="${START_GRACE:-300}"
log() { echo "shoal-run-daemon: $*"; }

if [ "$(shoal-node-setup mode)" = host ]; then
  log "the host runs the daemon (shoal-snapshotter.service); following it"
  trap 'log stopped; exit 0' TERM INT
  while :; do
    sleep 3600 &
    wait $!
  done
fi

until [ -S "$holder" ]; do
  log "waiting for the fd holder at $holder"
  sleep 1
done

daemon=
stopping=false
stop() {
  stopping=true
  # SIGTERM leaves the lazy mounts serving through the holder for the next daemon.
  [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null
}
trap stop TERM INT

while ! $stopping; do
  shoal-snapshotter --config "$config" &
  daemon=$!
  log "started shoal-snapshotter (pid $daemon)"
  failures=0
  healthy_once=false
  running_for=0
  while kill -0 "$daemon" 2>/dev/null && ! $stopping; do
    # `sleep` in the background, so a signal is taken at once.
    sleep "$interval" &
    wait $! 2>/dev/null
    running_for=$((running_for + interval))
    [ -n "${HEALTH_URL:-}" ] || continue
    $stopping && break
    if curl -fsS --max-time 5 -o /dev/null "$HEALTH_URL" 2>/dev/null; then
      failures=0
      healthy_once=true
    elif $healthy_once || [ "$running_for" -ge "$start_grace" ]; then
      # A start-up with many layers to mount again is not a hang: failures count once the
      # daemon answered, or once it had its start grace.
      failures=$((failures + 1))
      if [ "$failures" -ge "$failures_allowed" ]; then
        log "no answer at $HEALTH_URL $failures times in a row; restarting the daemon"
        kill -TERM "$daemon" 2>/dev/null
        # A daemon that does not stop in time is killed: the holder keeps the mounts.
        n=0
        while kill -0 "$daemon" 2>/dev/null && [ "$n" -lt "$grace" ]; do sleep 1; n=$((n + 1)); done
        kill -KILL "$daemon" 2>/dev/null
      fi
    fi
  done
  wait "$daemon"
  status=$?
  $stopping && break
  log "shoal-snapshotter exited ($status); starting it again in 1 s"
  sleep 1
done
wait "$daemon" 2>/dev/null
log "stopped"
