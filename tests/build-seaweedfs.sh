#!/usr/bin/env bash
# Build SeaweedFS's `weed` (the S3 server of the dev stack, k8s/seaweedfs) from the Go module proxy
# into a cache folder keyed by its version:
#   $KUBETRAIN_CACHE/seaweedfs/<version>/weed      (a second run returns at once)
# The module publishes no releases to the proxy, only pseudo-versions; the pin below is one.
# Its go.mod has a replace directive, which `go install mod@version` refuses: a wrapper module
# requires it and carries the same replace lines.
# Progress goes to stderr; stdout carries only `export KUBETRAIN_WEED=...`.
# KUBETRAIN_ASSETS_NO_BUILD=1: report a cache hit, never build.
set -euo pipefail

WEED_VERSION="${KUBETRAIN_WEED_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"   # github.com/seaweedfs/seaweedfs

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/k8s-wrapper.sh
source "$HERE/cluster/k8s-wrapper.sh"

CACHE="${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}"
OUT="$CACHE/seaweedfs/$WEED_VERSION"
log() { printf '[build-seaweedfs] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ -x "$OUT/weed" ]]; then
    log "cache hit: $OUT/weed"
    printf 'export KUBETRAIN_WEED=%q\n' "$OUT/weed"
    exit 0
fi
if [[ "${KUBETRAIN_ASSETS_NO_BUILD:-0}" == "1" ]]; then
    log "no weed in $OUT and KUBETRAIN_ASSETS_NO_BUILD=1: not building"
    exit 0
fi
command -v go >/dev/null || die "Go is needed to build SeaweedFS's weed"

mkdir -p "$OUT"
use_go_cache "$CACHE"
t0=$(date +%s)
dir="$CACHE/seaweedfs/build-$WEED_VERSION"
mkdir -p "$dir"
gomod=$(cd "$dir" && GOFLAGS=-modcacherw go mod download -json "github.com/seaweedfs/seaweedfs@$WEED_VERSION" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
[[ -s "$gomod" ]] || die "could not download github.com/seaweedfs/seaweedfs@$WEED_VERSION"
{
    echo "module kubetrain.test/seaweedfs-build"
    echo
    grep -m1 '^go ' "$gomod"
    echo
    echo "require github.com/seaweedfs/seaweedfs $WEED_VERSION"
    grep -E '^replace [^(]' "$gomod" || true
} > "$dir/go.mod"
log "building weed $WEED_VERSION (cold: many minutes; it has ~500 dependencies)"
(cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$OUT/.weed.tmp" github.com/seaweedfs/seaweedfs/weed)
mv -f "$OUT/.weed.tmp" "$OUT/weed"
log "weed built in $(( $(date +%s) - t0 ))s: $OUT/weed"
printf 'export KUBETRAIN_WEED=%q\n' "$OUT/weed"
