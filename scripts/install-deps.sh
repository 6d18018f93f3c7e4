#!/usr/bin/env bash
# Installs, idempotently, every Debian package Shoal's build, demo and tests use.
# Safe to run again: apt-get skips what is already installed.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it calls apt-get)" >&2
  exit 1
fi

packages=(
  # build
  build-essential pkg-config protobuf-compiler libfuse3-dev
  # runtime: containerd as the client, runc to run containers, fuse3 for lazy layers
  containerd runc fuse3
  # test images and registry
  docker-registry skopeo umoci busybox-static jq curl
  # overlaybd filesystems, multi-node networking
  e2fsprogs erofs-utils iproute2 kmod openssl
  # second eStargz producer, and stargz-snapshotter's Go library with the Go toolchain that
  # builds it offline (compatibility tests read Shoal's eStargz with it)
  stargz-snapshotter golang-go golang-github-containerd-stargz-snapshotter-dev
  # the benchmark's chart (scripts/bench/report.py); a virtual environment for the validator
  python3-matplotlib python3-venv
  # the DaemonSet image's programs beside Shoal's (scripts/build-image.sh)
  util-linux mount ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all Debian packages present"
fi

# The Debian registry package starts a system service on :5000; tests run their own registries
# on loopback ports of their choosing, so the packaged one is stopped to keep the machine quiet.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi

# The Kubernetes manifests' schema validator (PyPI; it ships the OpenAPI schemas, so the
# test runs offline), in a virtual environment of its own under Debian's python3.
validator_version=1.37.0
validator=/opt/shoal-tools/validate
if [ "$("$validator/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" != "$validator_version" ]; then
  echo "install-deps: installing kubernetes-validate $validator_version in $validator"
  rm -rf "$validator"
  /usr/bin/python3 -m venv "$validator"
  "$validator/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$validator_version"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install the stable Rust toolchain (rustup) first" >&2
  exit 1
fi

modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
echo "install-deps: done"
