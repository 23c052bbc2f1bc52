#!/usr/bin/env bash
# Build the programs of the node test tier, each from the Go module proxy into a
# cache folder keyed by its version:
#   kubelet, kube-scheduler, kube-controller-manager   k8s.io/kubernetes (the wrapper module of
#                                                      tests/cluster/build-assets.sh)
#   training-operator                                  github.com/kubeflow/training-operator (v1 operator)
#   coredns                                            github.com/coredns/coredns (cluster DNS)
#   prometheus                                         github.com/prometheus/prometheus (pod discovery)
#   pause                                              build/pause/linux/pause.c from k8s.io/kubernetes, gcc -static
#   trainer-controller-manager                         github.com/kubeflow/trainer/v2 (Kubeflow Trainer v2)
#   jobset                                             sigs.k8s.io/jobset (what Trainer v2 renders TrainJobs into)
# plus the manifests folders (CRDs, RBAC, webhook configurations) of the three operators' modules, and
# pause.tar, the pod sandbox image `kubetrain.test/pause:3.10` (no registry is reachable).
#
# Output: $KUBETRAIN_CACHE/node-assets/k8s<v>-operator<v>-coredns<v>/  (a second run returns at once)
# Progress goes to stderr; stdout carries only `export KUBETRAIN_NODE_ASSETS=...`.
# KUBETRAIN_ASSETS_NO_BUILD=1: report a cache hit, never build.
set -euo pipefail

K8S_VERSION="${KUBETRAIN_K8S_VERSION:-1.34.4}"   # as tests/cluster/build-assets.sh
# Staging releases the module proxy does not serve, as "module=version" (none at v1.34.4).
K8S_NODE_OVERRIDES=""
OPERATOR_VERSION="${KUBETRAIN_TRAINING_OPERATOR_VERSION:-1.8.1}"
COREDNS_VERSION="${KUBETRAIN_COREDNS_VERSION:-1.11.3}"
# Debian's prometheus is built without Kubernetes service discovery; this one has it (v0.55.1 = 2.55.1).
PROMETHEUS_MODULE_VERSION="${KUBETRAIN_PROMETHEUS_MODULE_VERSION:-0.55.1}"
TRAINER_VERSION="${KUBETRAIN_TRAINER_VERSION:-2.3.0}"   # as tests/cluster/build-assets.sh
JOBSET_VERSION="${KUBETRAIN_JOBSET_VERSION:-0.12.0}"    # the one Trainer v2.3.0's go.mod requires

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../cluster/k8s-wrapper.sh
source "$HERE/../cluster/k8s-wrapper.sh"

CACHE="${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}"
OUT="$CACHE/node-assets/k8s${K8S_VERSION}-operator${OPERATOR_VERSION}-coredns${COREDNS_VERSION}-prometheus${PROMETHEUS_MODULE_VERSION}-trainer${TRAINER_VERSION}-jobset${JOBSET_VERSION}"
BUILD_ROOT="$CACHE/k8s-assets/build"
BINARIES=(kubelet kube-scheduler kube-controller-manager training-operator coredns prometheus pause
          trainer-controller-manager jobset)
PAUSE_IMAGE="kubetrain.test/pause:3.10"

log() { printf '[build-node-assets] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }

complete() {
    local b
    for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done
    [[ -s "$OUT/operator-manifests/base/crds/kubeflow.org_pytorchjobs.yaml" && -s "$OUT/pause.tar" ]] &&
        [[ -d "$OUT/trainer-manifests/base/rbac" && -d "$OUT/jobset-manifests/components/rbac" ]]
}

if complete; then
    log "cache hit: $OUT"
    printf 'export KUBETRAIN_NODE_ASSETS=%q\n' "$OUT"
    exit 0
fi
if [[ "${KUBETRAIN_ASSETS_NO_BUILD:-0}" == "1" ]]; then
    log "no node assets in $OUT and KUBETRAIN_ASSETS_NO_BUILD=1: not building"
    exit 0
fi
command -v go >/dev/null || die "Go is needed to build the node tier (kubelet, operator, coredns)"
command -v gcc >/dev/null || die "gcc is needed to build the pause container's program"

mkdir -p "$OUT" "$BUILD_ROOT"
exec 9>"$CACHE/node-assets/.lock"
command -v flock >/dev/null && flock 9

use_go_cache "$CACHE"

build_k8s_node() {
    local t0 dir missing=0 b
    for b in kubelet kube-scheduler kube-controller-manager; do [[ -x "$OUT/$b" ]] || missing=1; done
    [[ $missing -eq 1 ]] || return 0
    t0=$(now)
    dir="$BUILD_ROOT/kubernetes-node-v$K8S_VERSION"
    write_k8s_wrapper_module "$dir" "kubetrain.test/kube-node-build" "$K8S_VERSION" "$K8S_NODE_OVERRIDES"
    build_k8s_commands "$dir" "$OUT" "$K8S_VERSION" kubelet kube-scheduler kube-controller-manager
    log "kubelet, kube-scheduler, kube-controller-manager built in $(( $(now) - t0 ))s"
}

# module_dir MODULE@VERSION: the module's source folder in the module cache (downloaded if needed).
module_dir() {
    (cd "$BUILD_ROOT" && GOFLAGS=-modcacherw go mod download -json "$1" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
}

# copy_tree SRC DEST: replace DEST by a writable copy of SRC, atomically.
copy_tree() {
    [[ -d "$1" ]] || die "no folder $1"
    rm -rf "$2" "$2.tmp"
    cp -r "$1" "$2.tmp"
    chmod -R u+w "$2.tmp"
    mv "$2.tmp" "$2"
}

build_operator() {
    local t0
    if [[ ! -x "$OUT/training-operator" ]]; then
        t0=$(now)
        log "building the Kubeflow training operator v$OPERATOR_VERSION (cold: minutes)"
        GOFLAGS=-modcacherw GOBIN="$OUT/.gobin" go install \
            "github.com/kubeflow/training-operator/cmd/training-operator.v1@v$OPERATOR_VERSION"
        mv -f "$OUT/.gobin/training-operator.v1" "$OUT/training-operator"
        rmdir "$OUT/.gobin" 2>/dev/null || true
        log "training-operator built in $(( $(now) - t0 ))s"
    fi
    copy_tree "$(module_dir "github.com/kubeflow/training-operator@v$OPERATOR_VERSION")/manifests" "$OUT/operator-manifests"
}

build_trainer() {
    local t0
    if [[ ! -x "$OUT/trainer-controller-manager" ]]; then
        t0=$(now)
        log "building Kubeflow Trainer v$TRAINER_VERSION's controller manager (cold: minutes)"
        GOFLAGS=-modcacherw GOBIN="$OUT/.gobin" go install -ldflags "-s -w" \
            "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager@v$TRAINER_VERSION"
        mv -f "$OUT/.gobin/trainer-controller-manager" "$OUT/trainer-controller-manager"
        rmdir "$OUT/.gobin" 2>/dev/null || true
        log "trainer-controller-manager built in $(( $(now) - t0 ))s"
    fi
    copy_tree "$(module_dir "github.com/kubeflow/trainer/v2@v$TRAINER_VERSION")/manifests" "$OUT/trainer-manifests"
}

build_jobset() {
    local t0 dir
    if [[ ! -x "$OUT/jobset" ]]; then
        t0=$(now)
        log "building JobSet v$JOBSET_VERSION (cold: minutes)"
        # `go install sigs.k8s.io/jobset@v...` needs the module's version list, which the proxy
        # refuses; a wrapper module that requires the exact version builds its main package.
        dir="$BUILD_ROOT/jobset-v$JOBSET_VERSION"
        mkdir -p "$dir"
        printf 'module kubetrain.test/jobset-build\n\ngo 1.26.0\n\nrequire sigs.k8s.io/jobset v%s\n' \
            "$JOBSET_VERSION" > "$dir/go.mod"
        (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$OUT/.jobset.tmp" sigs.k8s.io/jobset)
        mv -f "$OUT/.jobset.tmp" "$OUT/jobset"
        log "jobset built in $(( $(now) - t0 ))s"
    fi
    copy_tree "$(module_dir "sigs.k8s.io/jobset@v$JOBSET_VERSION")/config" "$OUT/jobset-manifests"
}

build_coredns() {
    local t0
    [[ -x "$OUT/coredns" ]] && return 0
    t0=$(now)
    log "building CoreDNS v$COREDNS_VERSION"
    GOFLAGS=-modcacherw GOBIN="$OUT/.gobin" go install -ldflags "-s -w" "github.com/coredns/coredns@v$COREDNS_VERSION"
    mv -f "$OUT/.gobin/coredns" "$OUT/coredns"
    rmdir "$OUT/.gobin" 2>/dev/null || true
    log "coredns built in $(( $(now) - t0 ))s"
}

build_prometheus() {
    local t0 dir gomod
    [[ -x "$OUT/prometheus" ]] && return 0
    t0=$(now)
    log "building Prometheus (module v$PROMETHEUS_MODULE_VERSION) with Kubernetes discovery (cold: minutes)"
    # Its go.mod has replace directives, which `go install mod@version` refuses: a wrapper module
    # requires it and carries the same replace and exclude blocks.
    dir="$BUILD_ROOT/prometheus-v$PROMETHEUS_MODULE_VERSION"
    mkdir -p "$dir"
    gomod=$(cd "$dir" && GOFLAGS=-modcacherw go mod download -json \
        "github.com/prometheus/prometheus@v$PROMETHEUS_MODULE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
    {
        echo "module kubetrain.test/prometheus-build"
        echo
        grep -m1 '^go ' "$gomod"
        echo
        echo "require github.com/prometheus/prometheus v$PROMETHEUS_MODULE_VERSION"
        awk '/^(replace|exclude) \(/{p=1} p{print} /^\)/{p=0} /^(replace|exclude) [^(]/{print}' "$gomod"
    } > "$dir/go.mod"
    (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$OUT/.prometheus.tmp" \
        github.com/prometheus/prometheus/cmd/prometheus)
    mv -f "$OUT/.prometheus.tmp" "$OUT/prometheus"
    log "prometheus built in $(( $(now) - t0 ))s"
}

build_pause() {
    local dir
    [[ -x "$OUT/pause" ]] && return 0
    dir=$(cd "$BUILD_ROOT" && GOFLAGS=-modcacherw go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
    [[ -s "$dir/build/pause/linux/pause.c" ]] || die "pause.c not found in k8s.io/kubernetes@v$K8S_VERSION"
    gcc -Os -static -Wall -Werror -DVERSION="v3.10-kubetrain" -o "$OUT/.pause.tmp" "$dir/build/pause/linux/pause.c"
    strip "$OUT/.pause.tmp" 2>/dev/null || true
    mv -f "$OUT/.pause.tmp" "$OUT/pause"
    log "pause built from $dir/build/pause/linux/pause.c"
}

pause_image() { # the pod sandbox image, an OCI archive for `ctr images import`
    [[ -s "$OUT/pause.tar" ]] && return 0
    python3 "$HERE/pause_image.py" "$OUT/pause" "$OUT/.pause.tar.tmp" "$PAUSE_IMAGE"
    mv -f "$OUT/.pause.tar.tmp" "$OUT/pause.tar"
}

T0=$(now)
build_pause
pause_image
build_k8s_node
build_coredns
build_operator
build_prometheus
build_trainer
build_jobset
log "node assets ready in $(( $(now) - T0 ))s: $OUT"
printf 'export KUBETRAIN_NODE_ASSETS=%q\n' "$OUT"
