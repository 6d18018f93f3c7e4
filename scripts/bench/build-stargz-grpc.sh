#!/usr/bin/env bash
# Builds stargz-grpc (the benchmark's stargz-snapshotter daemon) offline from Debian's Go
# sources: golang 1.19 in GOPATH mode over /usr/share/gocode. The packaged `service/resolver`
# package imports cri-api in its cri.go, and cri-api is not packaged, so a shadow copy of
# `service/` without resolver/cri.go comes first on GOPATH (nothing the daemon uses needs it).
#
# Usage: build-stargz-grpc.sh OUT_BINARY
set -euo pipefail

out=${1:?usage: build-stargz-grpc.sh OUT_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
pkg=github.com/containerd/stargz-snapshotter

if [ "$(id -u)" -eq 0 ]; then
  missing=()
  for p in golang-go golang-github-containerd-stargz-snapshotter-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
shadow="$work/src/$pkg/service"
mkdir -p "$shadow/resolver" "$work/src/stargz-grpc"
cp /usr/share/gocode/src/$pkg/service/*.go "$shadow/"
cp /usr/share/gocode/src/$pkg/service/resolver/registry.go "$shadow/resolver/"
cp "$here/stargz-grpc/main.go" "$work/src/stargz-grpc/"

export GO111MODULE=off GOPATH="$work:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$HOME/.cache/stargz-grpc-build}"
cd "$work/src/stargz-grpc"
go build -o "$out" .
echo "built $out"
