#!/usr/bin/env bash
# Shoal's demo on a fresh Debian 12 machine, as root: installs dependencies, builds Shoal, starts
# a private containerd + registry on loopback, builds a demo image, converts it to eStargz with
# `shoal convert`, and pulls + runs it two ways: the original image through containerd's overlayfs
# snapshotter (`ctr image pull` + `ctr run`) and the eStargz image lazily through Shoal
# (`shoal rpull` + `ctr run --snapshotter shoal`), printing the timings and bytes side by side.
# Everything lives under /run/shoal-demo and /var/lib/shoal-demo and is torn down at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (containerd, mounts)" >&2
  exit 1
fi

scripts/install-deps.sh
echo "demo: building Shoal (release)"
cargo build --release --bins -q
bin=${CARGO_TARGET_DIR:-$repo/target}/release

run=/run/shoal-demo
data=/var/lib/shoal-demo
port=${SHOAL_DEMO_PORT:-5123}
registry=127.0.0.1:$port
image=$registry/shoal-demo:latest
lazy_image=$registry/shoal-demo:estargz
metrics=127.0.0.1:${SHOAL_DEMO_METRICS_PORT:-9465}
payload_mib=${SHOAL_DEMO_PAYLOAD_MIB:-96}

pids=()
cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  # Whatever a killed containerd left mounted under our directories.
  grep -E " ($run|$data)" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
  rm -rf "$run" "$data"
}
trap cleanup EXIT
cleanup
mkdir -p "$run" "$data"

wait_for() { # wait_for DESCRIPTION LOG COMMAND...: bounded (30s); shows LOG's tail on failure
  local what=$1 log=$2; shift 2
  for _ in $(seq 1 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "demo: $what did not come up; the end of $log:" >&2
  tail -n 20 "$log" >&2 || true
  exit 1
}

echo "demo: starting a registry on $registry"
cat > "$data/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $data/registry}}
http: {addr: $registry}
YML
docker-registry serve "$data/registry.yml" >"$data/registry.log" 2>&1 &
pids+=($!)
wait_for registry "$data/registry.log" curl -sf "http://$registry/v2/"

echo "demo: building a demo image (busybox + ${payload_mib} MiB of data the command never reads)"
work=$data/build
mkdir -p "$work"
umoci init --layout "$work/oci"
umoci new --image "$work/oci:demo"
umoci unpack --image "$work/oci:demo" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/data" "$rootfs/etc"
cp /bin/busybox "$rootfs/bin/busybox"
for tool in sh echo cat ls wc; do ln -sf busybox "$rootfs/bin/$tool"; done
echo "hello from a container on Shoal" > "$rootfs/etc/motd"
for i in $(seq 1 $((payload_mib / 16))); do
  head -c 16M /dev/urandom > "$rootfs/data/blob-$i"
done
umoci repack --image "$work/oci:demo" "$work/bundle" >/dev/null
umoci config --image "$work/oci:demo" --config.cmd /bin/sh --config.cmd -c --config.cmd 'cat /etc/motd'
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:demo" "docker://$image"

echo "demo: starting shoal-snapshotter"
cat > "$data/shoal.toml" <<TOML
root = "$data/shoal"
socket = "$run/shoal.sock"
[log]
level = "info"
[registry.hosts."$registry"]
plain_http = true
[metrics]
address = "$metrics"
TOML
"$bin/shoal-snapshotter" --config "$data/shoal.toml" >"$data/shoal.log" 2>&1 &
pids+=($!)
wait_for shoal-snapshotter "$data/shoal.log" "$bin/shoal" --config "$data/shoal.toml" status

echo "demo: starting a private containerd with Shoal as proxy snapshotter"
cat > "$data/containerd.toml" <<TOML
version = 2
root = "$data/containerd"
state = "$run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[proxy_plugins.shoal]
  type = "snapshot"
  address = "$run/shoal.sock"
TOML
containerd --config "$data/containerd.toml" >"$data/containerd.log" 2>&1 &
pids+=($!)
ctr() { command ctr --address "$run/containerd.sock" "$@"; }
wait_for containerd "$data/containerd.log" ctr version

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

echo "demo: converting the image to eStargz with shoal convert"
"$bin/shoal" --config "$data/shoal.toml" convert --plain-http "$image" "$lazy_image"

registry_bytes() { curl -sf "http://$metrics/metrics" | awk '/^shoal_read_bytes_total\{source="registry"\}/ {print $2}'; }

t0=$(now)
ctr -n demo-overlayfs image pull --plain-http "$image" >/dev/null
t1=$(now)
# Output through a log file, not ctr's FIFOs, which can lose what a short-lived task printed.
ovl_out=$(ctr -n demo-overlayfs run --rm --log-uri "file://$data/overlayfs-run.log" "$image" demo-overlayfs && cat "$data/overlayfs-run.log")
t2=$(now)
ovl_pull=$(elapsed "$t0" "$t1"); ovl_run=$(elapsed "$t1" "$t2")
ovl_bytes=$(skopeo inspect --raw --tls-verify=false "docker://$image" | jq '[.layers[].size] | add')

before=$(registry_bytes)
t0=$(now)
"$bin/shoal" --config "$data/shoal.toml" rpull --address "$run/containerd.sock" -n demo-shoal --plain-http "$lazy_image"
t1=$(now)
shoal_out=$(ctr -n demo-shoal run --rm --snapshotter shoal --log-uri "file://$data/shoal-run.log" "$lazy_image" demo-shoal && cat "$data/shoal-run.log")
t2=$(now)
shoal_pull=$(elapsed "$t0" "$t1"); shoal_run=$(elapsed "$t1" "$t2")
after=$(registry_bytes)
shoal_bytes=$(( ${after:-0} - ${before:-0} ))
echo
echo "container output (overlayfs): $ovl_out"
echo "container output (shoal):     $shoal_out"
echo
printf '%-22s %10s %10s %10s %16s\n' "" "pull (s)" "run (s)" "total (s)" "layer bytes read"
printf '%-22s %10s %10s %10s %16s\n' "overlayfs (ctr pull)" "$ovl_pull" "$ovl_run" "$(awk -v a="$ovl_pull" -v b="$ovl_run" 'BEGIN{printf "%.2f", a+b}')" "$((ovl_bytes / 1024)) KiB"
printf '%-22s %10s %10s %10s %16s\n' "shoal (lazy eStargz)" "$shoal_pull" "$shoal_run" "$(awk -v a="$shoal_pull" -v b="$shoal_run" 'BEGIN{printf "%.2f", a+b}')" "$((shoal_bytes / 1024)) KiB"
echo
"$bin/shoal" --config "$data/shoal.toml" status
if [ "$shoal_out" != "hello from a container on Shoal" ]; then
  echo "demo: FAILED: unexpected output from the Shoal container" >&2
  exit 1
fi
echo "demo: OK"
