#!/usr/bin/env bash
# What each layer format costs in bytes for a real distribution: a Debian rootfs made by
# debootstrap (from Debian's package registry, or one given with --rootfs) is packed as one OCI
# layer (gzip, as umoci writes it), pushed to a loopback registry, and converted by
# `shoal convert` to eStargz, overlaybd (zstd ZFile, the default) and overlaybd-lz4. Prints a table and
# writes it, with the raw numbers, to --out. A benchmark: not run by the tests.
#
#   scripts/bench/format-sizes.sh [--bin-dir target/release] [--rootfs DIR] [--out bench-results]
#                                 [--include python3,gcc]
set -euo pipefail
cd "$(dirname "$0")/../.."

bin_dir=target/release
rootfs=""
out=bench-results
include=python3,gcc
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --rootfs) rootfs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --include) include=$2; shift 2 ;;
    *) echo "format-sizes: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "format-sizes: needs root (overlaybd conversion loop-mounts)" >&2; exit 1; }
shoal=$bin_dir/shoal
[ -x "$shoal" ] || { echo "format-sizes: no $shoal; build it first (cargo build --release --bins)" >&2; exit 1; }

work=$(mktemp -d /tmp/format-sizes.XXXXXX)
registry_pid=""
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$rootfs" ]; then
  command -v debootstrap >/dev/null || apt-get install -y debootstrap >/dev/null
  rootfs=$work/rootfs
  echo "format-sizes: debootstrap bookworm (minbase + $include) into $rootfs"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase --include="$include" bookworm "$rootfs" ${mirror:+"$mirror"} \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
fi

echo "format-sizes: packing $rootfs as one OCI layer"
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$work/bundle" >/dev/null
cp -a "$rootfs/." "$work/bundle/rootfs/"
umoci repack --image "$layout:latest" "$work/bundle"

addr=127.0.0.$(( (RANDOM % 200) + 20 )):5000
mkdir -p "$work/registry"
cat >"$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: $addr
EOF
docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -sf "http://$addr/v2/" >/dev/null && break; sleep 0.1; done

cat >"$work/shoal.toml" <<EOF
root = "$work/shoal-root"
socket = "$work/shoal.sock"
[registry.hosts."$addr"]
plain_http = true
EOF

# Sum of the layer sizes in a pushed image's manifest.
layer_bytes() {
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$addr/v2/$1/manifests/$2" |
    python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}

skopeo copy --quiet --dest-tls-verify=false "oci:$layout:latest" "docker://$addr/bench/debian:gzip"
declare -A bytes seconds
bytes[gzip]=$(layer_bytes bench/debian gzip)
for format in estargz overlaybd overlaybd-lz4; do
  started=$(date +%s.%N)
  "$shoal" convert --config "$work/shoal.toml" --plain-http --format "$format" \
    "$addr/bench/debian:gzip" "$addr/bench/debian:$format" >/dev/null
  seconds[$format]=$(echo "$(date +%s.%N) - $started" | bc)
  bytes[$format]=$(layer_bytes bench/debian "$format")
done
unpacked=$(du -sb "$rootfs" | cut -f1)

mkdir -p "$out"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
report=$out/format-sizes-$commit.md
{
  echo "Debian bookworm minbase + $include: $(python3 -c "print(f'{$unpacked/1e6:.1f}')") MB unpacked, one layer."
  echo
  echo "| format | layer MB | x gzip | convert s |"
  echo "|---|---|---|---|"
  for format in gzip estargz overlaybd overlaybd-lz4; do
    python3 -c "
b=${bytes[$format]}; g=${bytes[gzip]}; s='${seconds[$format]:-}'
print(f'| $format | {b/1e6:.1f} | {b/g:.2f} | {float(s):.1f} |' if s else f'| $format | {b/1e6:.1f} | {b/g:.2f} | |')"
  done
} | tee "$report"
echo "format-sizes: wrote $report"
