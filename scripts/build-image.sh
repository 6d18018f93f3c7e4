#!/usr/bin/env bash
# Builds Shoal's container image, the one deploy/kubernetes/shoal.yaml runs, without Docker:
# a root filesystem of Shoal's binaries and the Debian programs its pods run (busybox's shell
# and tools, openssl, curl, mount, nsenter) with exactly the shared libraries they load,
# packed by umoci into an OCI layout and, with --push, copied to a registry by skopeo.
#
#   scripts/build-image.sh [--from DIR] [--out DIR] [--tag TAG] [--push REF] [--archive FILE]
#
#   --from DIR      binaries already built in DIR (default: a release build, target/release)
#   --out DIR       the OCI layout (default target/image/oci); the image is DIR:TAG
#   --tag TAG       default: the version `shoal --version` prints (0.1.0)
#   --push REF      then `skopeo copy` it to docker://REF (skopeo's --dest-* flags through
#                   SKOPEO_FLAGS, e.g. SKOPEO_FLAGS=--dest-tls-verify=false)
#   --archive FILE  also write it as an OCI archive (for `ctr image import`)
#
# No base image: a Debian base (debootstrap) would put a whole distribution (apt, perl,
# 130 MB) into the nodes' most privileged pod for the sake of six programs, and would need the
# network for every build. The files come from this machine's Debian packages (installed by
# scripts/install-deps.sh), their versions are recorded in the image
# (/usr/local/share/shoal/packages.txt). A build whose inputs did not change is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

from=
out=target/image/oci
tag=
push=
archive=
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from="${2:?--from needs a directory}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --push) push="${2:?--push needs an image reference}"; shift 2 ;;
    --archive) archive="${2:?--archive needs a file}"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "build-image: run as root (the image's files must be owned by root)" >&2
  exit 1
fi
if [ -z "$from" ]; then
  cargo build --release --bins
  from=target/release
fi
binaries=(shoal shoal-snapshotter shoal-fdholder)
for binary in "${binaries[@]}"; do
  [ -x "$from/$binary" ] || { echo "build-image: no $from/$binary (build it first)" >&2; exit 1; }
done
[ -n "$tag" ] || tag="$("$from/shoal" --version | awk '{print $2}')"

# The Debian packages whose programs the pods run, and the programs.
packages=(busybox-static openssl curl mount util-linux ca-certificates libc6)
programs=(/bin/busybox /usr/bin/openssl /usr/bin/curl /bin/mount /bin/umount /usr/bin/nsenter)
own_files=(scripts/image/node-setup.sh scripts/image/run-daemon.sh scripts/image/run-holder.sh
  scripts/image/make-peer-ca.sh scripts/shoal-snapshotter.service scripts/shoal-fdholder.service
  deploy/kubernetes/containerd-config.toml deploy/kubernetes/containerd-config-v3.toml)

# Skipped when nothing that goes in changed: the binaries, this script, the files it copies
# and the packages' versions.
stamp="$( {
  sha256sum "${binaries[@]/#/$from/}" "$0" "${own_files[@]}"
  dpkg-query -W "${packages[@]}"
  echo "$tag"
} | sha256sum | cut -d' ' -f1)"
if [ -f "$out/shoal.stamp" ] && [ "$(cat "$out/shoal.stamp")" = "$stamp:$tag" ] &&
  { [ -z "$archive" ] || [ -f "$archive" ]; }; then
  echo "build-image: $out:$tag is up to date"
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/shoal-image.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  rootfs="$work/rootfs"
  install -d -m 0755 "$rootfs"/{bin,etc,lib,usr/local/bin,usr/local/share/shoal,var/lib/shoal,run/shoal,dev,proc,sys,root}
  install -d -m 1777 "$rootfs/tmp"
  # Everything a program loads, at the path its loader looks for it.
  copy_with_libraries() {
    local program="$1" target="$2"
    install -D -m 0755 "$program" "$rootfs$target"
    # A static program (busybox) has none: ldd and grep fail, which is no error here.
    { ldd "$program" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r library; do
      real="$(readlink -f "$library")"
      install -D -m 0755 "$real" "$rootfs$library"
    done
  }
  for binary in "${binaries[@]}"; do
    # Debug info stays behind: it is most of a binary's size (install.sh keeps it apart).
    objcopy --strip-debug "$from/$binary" "$work/$binary"
    copy_with_libraries "$work/$binary" "/usr/local/bin/$binary"
  done
  for program in "${programs[@]}"; do
    copy_with_libraries "$program" "/usr/bin/$(basename "$program")"
  done
  # busybox's tools as /bin/NAME, where the image's programs do not already stand.
  for applet in $(/bin/busybox --list); do
    [ -e "$rootfs/usr/bin/$applet" ] || ln -s /usr/bin/busybox "$rootfs/bin/$applet"
  done
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  install -D -m 0644 "$(readlink -f /usr/lib/ssl/openssl.cnf)" "$rootfs/usr/lib/ssl/openssl.cnf"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  install -m 0755 scripts/image/node-setup.sh "$rootfs/usr/local/bin/shoal-node-setup"
  install -m 0755 scripts/image/run-daemon.sh "$rootfs/usr/local/bin/shoal-run-daemon"
  install -m 0755 scripts/image/run-holder.sh "$rootfs/usr/local/bin/shoal-run-holder"
  install -m 0755 scripts/image/make-peer-ca.sh "$rootfs/usr/local/bin/shoal-make-peer-ca"
  install -m 0644 deploy/kubernetes/containerd-config.toml deploy/kubernetes/containerd-config-v3.toml \
    scripts/shoal-snapshotter.service scripts/shoal-fdholder.service "$rootfs/usr/local/share/shoal/"
  dpkg-query -W "${packages[@]}" >"$rootfs/usr/local/share/shoal/packages.txt"

  rm -rf "$out"
  mkdir -p "$(dirname "$out")"
  umoci init --layout "$out"
  umoci new --image "$out:$tag"
  umoci unpack --image "$out:$tag" "$work/bundle" >/dev/null
  cp -a "$rootfs/." "$work/bundle/rootfs/"
  umoci repack --image "$out:$tag" "$work/bundle"
  umoci config --image "$out:$tag" \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin \
    --config.cmd shoal-run-daemon \
    --config.label "org.opencontainers.image.title=shoal" \
    --config.label "org.opencontainers.image.version=$tag" \
    --config.label "org.opencontainers.image.revision=$("$from/shoal" --version | sed -n 's/.*(\(.*\)).*/\1/p')"
  umoci gc --layout "$out"
  if [ -n "$archive" ]; then
    rm -f "$archive"
    skopeo copy --quiet "oci:$out:$tag" "oci-archive:$archive:$tag"
  fi
  echo "$stamp:$tag" >"$out/shoal.stamp"
  echo "build-image: built $out:$tag ($(du -sh "$out/blobs" | cut -f1) of blobs)"
fi
if [ -n "$push" ]; then
  # shellcheck disable=SC2086 # flags, split on purpose
  skopeo copy ${SKOPEO_FLAGS:-} "oci:$out:$tag" "docker://$push"
  echo "build-image: pushed $push"
fi
