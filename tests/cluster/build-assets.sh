#!/usr/bin/env bash
# Build the binaries of the cluster test tier (envtest convention):
#   kube-apiserver  from k8s.io/kubernetes (staging modules replaced by their v0.X.Y releases)
#   etcd            from go.etcd.io/etcd/server/v3
#   kubectl         from the same k8s.io/kubernetes wrapper module (client and server versions match)
# plus the PyTorchJob CRD from the Go module github.com/kubeflow/training-operator, the
# PodMonitor/PrometheusRule CRDs from github.com/prometheus-operator/prometheus-operator and
# Kubeflow Trainer v2's CRDs (TrainJob, TrainingRuntime, ClusterTrainingRuntime) with its
# torch-distributed runtime from github.com/kubeflow/trainer/v2.
#
# Everything comes from the Go module proxy configured in the environment
# (`go env GOPROXY`); nothing here names a host. Output folder:
#   $KUBETRAIN_CACHE/k8s-assets/<k8s-version>-etcd<etcd-version>/
# A second run finds the binaries and returns in well under a second.
#
# Progress goes to stderr; stdout carries only `export NAME=value` lines:
#   KUBEBUILDER_ASSETS, KUBETRAIN_PYTORCHJOB_CRD, KUBETRAIN_MONITORING_CRDS and KUBETRAIN_TRAINER_CRDS (folders)
# KUBETRAIN_ASSETS_NO_BUILD=1: report a cache hit (or a usable KUBEBUILDER_ASSETS), never build.
set -euo pipefail

# v1.34: Trainer v2's CRDs use CEL on embedded metadata that v1.31 cannot compile; JobSet tests 1.32-1.34.
K8S_VERSION="${KUBETRAIN_K8S_VERSION:-1.34.4}"           # k8s.io/kubernetes (kube-apiserver, kubectl)
ETCD_VERSION="${KUBETRAIN_ETCD_VERSION:-3.5.35}"         # go.etcd.io/etcd/server/v3
TRAINING_OPERATOR_VERSION="${KUBETRAIN_TRAINING_OPERATOR_VERSION:-1.8.1}"
CRD_PATH_IN_MODULE="manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
PROMETHEUS_OPERATOR_VERSION="${KUBETRAIN_PROMETHEUS_OPERATOR_VERSION:-0.79.2}"
MONITORING_CRDS_IN_MODULE="example/prometheus-operator-crd"
MONITORING_CRDS=(monitoring.coreos.com_podmonitors.yaml monitoring.coreos.com_prometheusrules.yaml)
TRAINER_VERSION="${KUBETRAIN_TRAINER_VERSION:-2.3.0}"      # github.com/kubeflow/trainer/v2 (Kubeflow Trainer v2)
TRAINER_FILES=(crds/trainer.kubeflow.org_trainjobs.yaml crds/trainer.kubeflow.org_trainingruntimes.yaml
               crds/trainer.kubeflow.org_clustertrainingruntimes.yaml runtimes/torch_distributed.yaml)

CACHE="${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}"
ASSETS="$CACHE/k8s-assets/${K8S_VERSION}-etcd${ETCD_VERSION}"
CRD_DIR="$ASSETS/crds/training-operator-v${TRAINING_OPERATOR_VERSION}"
CRD_FILE="$CRD_DIR/kubeflow.org_pytorchjobs.yaml"
MONITORING_CRD_DIR="$ASSETS/crds/prometheus-operator-v${PROMETHEUS_OPERATOR_VERSION}"
TRAINER_CRD_DIR="$ASSETS/crds/trainer-v${TRAINER_VERSION}"
BUILD_ROOT="$CACHE/k8s-assets/build"

# shellcheck source=k8s-wrapper.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-wrapper.sh"

log() { printf '[build-assets] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

have_binaries() { # DIR
    local d="$1" b
    for b in etcd kube-apiserver kubectl; do
        [[ -x "$d/$b" ]] || return 1
    done
}

emit() { # ASSET_DIR CRD_FILE
    printf 'export KUBEBUILDER_ASSETS=%q\n' "$1"
    printf 'export KUBETRAIN_PYTORCHJOB_CRD=%q\n' "$2"
    if have_monitoring_crds; then
        printf 'export KUBETRAIN_MONITORING_CRDS=%q\n' "$MONITORING_CRD_DIR"
    fi
    if have_trainer_files; then
        printf 'export KUBETRAIN_TRAINER_CRDS=%q\n' "$TRAINER_CRD_DIR"
    fi
}

have_trainer_files() {
    local f
    for f in "${TRAINER_FILES[@]}"; do
        [[ -s "$TRAINER_CRD_DIR/$(basename "$f")" ]] || return 1
    done
}

fetch_trainer_files() {
    local dir f
    log "fetching github.com/kubeflow/trainer/v2@v$TRAINER_VERSION (CRDs, torch runtime)"
    mkdir -p "$BUILD_ROOT"
    dir=$(cd "$BUILD_ROOT" && GOFLAGS=-modcacherw go mod download -json \
        "github.com/kubeflow/trainer/v2@v$TRAINER_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
    mkdir -p "$TRAINER_CRD_DIR"
    for f in "${TRAINER_FILES[@]}"; do
        [[ -s "$dir/manifests/base/$f" ]] || die "not found: $dir/manifests/base/$f"
        cp -f "$dir/manifests/base/$f" "$TRAINER_CRD_DIR/$(basename "$f").tmp"
        chmod 644 "$TRAINER_CRD_DIR/$(basename "$f").tmp"
        mv -f "$TRAINER_CRD_DIR/$(basename "$f").tmp" "$TRAINER_CRD_DIR/$(basename "$f")"
    done
    log "Trainer v2 CRDs: $TRAINER_CRD_DIR"
}

have_monitoring_crds() {
    local f
    for f in "${MONITORING_CRDS[@]}"; do
        [[ -s "$MONITORING_CRD_DIR/$f" ]] || return 1
    done
}

fetch_monitoring_crds() {
    local dir f
    log "fetching github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION (CRDs)"
    mkdir -p "$BUILD_ROOT"
    dir=$(cd "$BUILD_ROOT" && GOFLAGS=-modcacherw go mod download -json \
        "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
    mkdir -p "$MONITORING_CRD_DIR"
    for f in "${MONITORING_CRDS[@]}"; do
        [[ -s "$dir/$MONITORING_CRDS_IN_MODULE/$f" ]] || die "CRD not found at $dir/$MONITORING_CRDS_IN_MODULE/$f"
        cp -f "$dir/$MONITORING_CRDS_IN_MODULE/$f" "$MONITORING_CRD_DIR/$f.tmp"
        chmod 644 "$MONITORING_CRD_DIR/$f.tmp"
        mv -f "$MONITORING_CRD_DIR/$f.tmp" "$MONITORING_CRD_DIR/$f"
    done
    log "monitoring CRDs: $MONITORING_CRD_DIR"
}

# A user-provided KUBEBUILDER_ASSETS that holds the binaries wins.
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && have_binaries "$KUBEBUILDER_ASSETS"; then
    USER_ASSETS="$KUBEBUILDER_ASSETS"
    log "using KUBEBUILDER_ASSETS=$USER_ASSETS (already holds etcd, kube-apiserver, kubectl)"
else
    USER_ASSETS=""
fi

# The monitoring CRDs are a download, not a build: fetch them unless told to stay offline.
if ! have_monitoring_crds && [[ "${KUBETRAIN_ASSETS_NO_BUILD:-0}" != "1" ]]; then
    GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod" fetch_monitoring_crds
fi
if ! have_trainer_files && [[ "${KUBETRAIN_ASSETS_NO_BUILD:-0}" != "1" ]]; then
    GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod" fetch_trainer_files
fi

# Fast path: everything already there.
if [[ -z "$USER_ASSETS" && -x "$ASSETS/etcd" && -x "$ASSETS/kube-apiserver" && -x "$ASSETS/kubectl" && -s "$CRD_FILE" ]]; then
    log "cache hit: $ASSETS"
    emit "$ASSETS" "$CRD_FILE"
    exit 0
fi
if [[ -n "$USER_ASSETS" && -n "${KUBETRAIN_PYTORCHJOB_CRD:-}" && -s "${KUBETRAIN_PYTORCHJOB_CRD}" ]]; then
    emit "$USER_ASSETS" "$KUBETRAIN_PYTORCHJOB_CRD"
    exit 0
fi
if [[ -n "$USER_ASSETS" && -s "$CRD_FILE" ]]; then
    emit "$USER_ASSETS" "$CRD_FILE"
    exit 0
fi

if [[ "${KUBETRAIN_ASSETS_NO_BUILD:-0}" == "1" ]]; then
    log "no cluster assets in $ASSETS and KUBETRAIN_ASSETS_NO_BUILD=1: not building"
    exit 0
fi

command -v go >/dev/null || die "Go toolchain not found; it is needed to build kube-apiserver and etcd (or set KUBEBUILDER_ASSETS, or KUBETRAIN_SKIP_CLUSTER_BUILD=1 to skip the cluster tier)"

mkdir -p "$ASSETS" "$BUILD_ROOT"
# One builder at a time per cache (a second caller waits, then takes the cache hit).
if command -v flock >/dev/null; then
    exec 9>"$CACHE/k8s-assets/.lock"
    flock 9
fi

use_go_cache "$CACHE"
log "go: $(go version) GOPROXY=$(go env GOPROXY)"

now() { date +%s; }

build_k8s_binaries() { # kube-apiserver and kubectl, from one wrapper module
    local t0 dir
    t0=$(now)
    dir="$BUILD_ROOT/kubernetes-v$K8S_VERSION"
    log "resolving k8s.io/kubernetes@v$K8S_VERSION"
    write_k8s_wrapper_module "$dir" "kubetrain.test/kube-apiserver-build" "$K8S_VERSION"
    build_k8s_commands "$dir" "$ASSETS" "$K8S_VERSION" kube-apiserver kubectl
    log "kube-apiserver, kubectl built in $(( $(now) - t0 ))s"
}

build_etcd() {
    local t0 dir
    t0=$(now)
    dir="$BUILD_ROOT/etcd-v$ETCD_VERSION"
    mkdir -p "$dir"
    cat > "$dir/go.mod" <<EOF
module kubetrain.test/etcd-build

go 1.22.0

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION
EOF
    log "building etcd v$ETCD_VERSION"
    (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$ASSETS/.etcd.tmp" go.etcd.io/etcd/server/v3)
    mv -f "$ASSETS/.etcd.tmp" "$ASSETS/etcd"
    log "etcd built in $(( $(now) - t0 ))s"
}

fetch_crd() {
    local dir
    log "fetching github.com/kubeflow/training-operator@v$TRAINING_OPERATOR_VERSION"
    dir=$(cd "$BUILD_ROOT" && GOFLAGS=-modcacherw go mod download -json \
        "github.com/kubeflow/training-operator@v$TRAINING_OPERATOR_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
    [[ -s "$dir/$CRD_PATH_IN_MODULE" ]] || die "CRD not found at $dir/$CRD_PATH_IN_MODULE"
    mkdir -p "$CRD_DIR"
    cp -f "$dir/$CRD_PATH_IN_MODULE" "$CRD_FILE.tmp"
    chmod 644 "$CRD_FILE.tmp"
    mv -f "$CRD_FILE.tmp" "$CRD_FILE"
    log "PyTorchJob CRD: $CRD_FILE"
}

T_START=$(now)
if [[ -z "$USER_ASSETS" ]]; then
    [[ -x "$ASSETS/kube-apiserver" && -x "$ASSETS/kubectl" ]] || build_k8s_binaries
    [[ -x "$ASSETS/etcd" ]] || build_etcd
fi
[[ -s "$CRD_FILE" ]] || fetch_crd
log "cluster assets ready in $(( $(now) - T_START ))s: ${USER_ASSETS:-$ASSETS}"
emit "${USER_ASSETS:-$ASSETS}" "$CRD_FILE"
