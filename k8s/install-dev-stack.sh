#!/usr/bin/env bash
# Install the kubetrain development stack into the current kubectl context
# (a kind cluster from k8s/kind-cluster.yaml):
#   1. the Kubeflow training operator v1.8.1 (k8s/training-operator)
#   2. the experiment namespace, example S3 credentials, SeaweedFS and its bucket (k8s/)
#   3. kube-prometheus-stack with k8s/monitoring/kube-prometheus-stack-values.yaml
# Idempotent: re-running upgrades in place.
#
# Environment:
#   KUBETRAIN_SKIP_MONITORING=1    skip step 3 (no Prometheus/Grafana)
#   KUBE_PROMETHEUS_STACK_VERSION  chart version (default below)
#   KUBETRAIN_WAIT_TIMEOUT         kubectl wait timeout (default 600s)
set -euo pipefail

K8S_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBE_PROMETHEUS_STACK_VERSION="${KUBE_PROMETHEUS_STACK_VERSION:-66.3.0}"
PROMETHEUS_COMMUNITY_REPO="https://prometheus-community.github.io/helm-charts"
TIMEOUT="${KUBETRAIN_WAIT_TIMEOUT:-600s}"

log() { printf '[install-dev-stack] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in kubectl helm; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH"
done
kubectl cluster-info >/dev/null 2>&1 || die "no cluster answers in kubectl context '$(kubectl config current-context 2>/dev/null || echo none)'"

log "training operator (kubeflow namespace)"
# Server-side: the CRDs exceed the last-applied annotation's size limit.
kubectl apply --server-side --force-conflicts -k "$K8S_DIR/training-operator"
kubectl wait --for=condition=Established --timeout="$TIMEOUT" crd/pytorchjobs.kubeflow.org
kubectl -n kubeflow rollout status deployment/training-operator --timeout="$TIMEOUT"

log "namespace kubetrain, S3 credentials, SeaweedFS"
kubectl apply --server-side -k "$K8S_DIR"
kubectl -n kubetrain rollout status deployment/seaweedfs --timeout="$TIMEOUT"
kubectl -n kubetrain wait --for=condition=Complete --timeout="$TIMEOUT" job/seaweedfs-create-bucket

if [[ "${KUBETRAIN_SKIP_MONITORING:-0}" == "1" ]]; then
    log "KUBETRAIN_SKIP_MONITORING=1: no kube-prometheus-stack"
else
    log "kube-prometheus-stack $KUBE_PROMETHEUS_STACK_VERSION (monitoring namespace)"
    helm upgrade --install kube-prometheus-stack kube-prometheus-stack \
        --repo "$PROMETHEUS_COMMUNITY_REPO" --version "$KUBE_PROMETHEUS_STACK_VERSION" \
        --namespace monitoring --create-namespace \
        -f "$K8S_DIR/monitoring/kube-prometheus-stack-values.yaml" \
        --wait --timeout "$TIMEOUT"
fi
log "ready: helm install quickstart helm/kubetrain -n kubetrain -f examples/quickstart.yaml -f k8s/values-kind.yaml"
