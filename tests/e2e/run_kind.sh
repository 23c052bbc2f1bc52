#!/usr/bin/env bash
# End to end on kind: the k8s/README.md walk-through, scripted.
#   kind cluster -> trainer image built and loaded -> training operator, SeaweedFS,
#   kube-prometheus-stack -> `helm install quickstart` -> the PyTorchJob Succeeded,
#   checkpoints in the bucket, the summary line in the master's log, kubetrain
#   series in Prometheus and the dashboard in Grafana.
# Where Docker (a running engine) or kind is missing it prints why and exits 0.
#
# Environment:
#   TORCH_INDEX_URL          PyTorch's CPU wheel index (optional: without it torch comes from PyPI, bigger image)
#   KUBETRAIN_E2E_CLUSTER    kind cluster name (default kubetrain-e2e)
#   KUBETRAIN_E2E_KEEP=1     keep the cluster afterwards (default: delete it)
#   KUBETRAIN_E2E_MAX_STEPS  training.maxSteps of the job (default 60)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${KUBETRAIN_E2E_CLUSTER:-kubetrain-e2e}"
IMAGE="kubetrain/trainer:e2e"
NS=kubetrain
EXPERIMENT=quickstart
MAX_STEPS="${KUBETRAIN_E2E_MAX_STEPS:-60}"

log() { printf '[e2e] %s\n' "$*" >&2; }
skip() { printf 'SKIP: kind e2e: %s\n' "$*"; exit 0; }
die() { log "FAILED: $*"; exit 1; }

# ------------------------------------------------------------------ prerequisites
command -v docker >/dev/null || skip "docker is not installed"
docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
command -v kind >/dev/null || skip "kind is not installed"
for tool in kubectl helm; do
    command -v "$tool" >/dev/null || skip "$tool is not on PATH"
done

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        log "diagnostics:"
        kubectl -n "$NS" get pytorchjobs,pods,jobs -o wide >&2 || true
        kubectl -n "$NS" logs "$EXPERIMENT-master-0" --tail=50 >&2 || true
    fi
    # shellcheck disable=SC2086  # two pids
    [[ -z "${PF_PID:-}" ]] || kill $PF_PID 2>/dev/null || true
    if [[ "${KUBETRAIN_E2E_KEEP:-0}" != "1" ]]; then
        kind delete cluster --name "$CLUSTER" >&2 || true
    fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ the walk
log "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config "$REPO/k8s/kind-cluster.yaml" --wait 5m
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "trainer image $IMAGE"
docker build -f "$REPO/images/Dockerfile" --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" -t "$IMAGE" "$REPO"
docker run --rm "$IMAGE" --version
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "development stack"
bash "$REPO/k8s/install-dev-stack.sh"

log "helm install $EXPERIMENT"
helm upgrade --install "$EXPERIMENT" "$REPO/helm/kubetrain" -n "$NS" \
    -f "$REPO/examples/quickstart.yaml" -f "$REPO/k8s/values-kind.yaml" \
    --set image.tag=e2e --set training.maxSteps="$MAX_STEPS" --set checkpoint.everySteps=20
kubectl -n "$NS" wait "pytorchjob/$EXPERIMENT" --for=condition=Succeeded --timeout=20m \
    || die "PyTorchJob $EXPERIMENT did not succeed"

log "summary line of rank 0"
summary=$(kubectl -n "$NS" logs "$EXPERIMENT-master-0" | grep '"event": *"summary"' | tail -n1)
[[ -n "$summary" ]] || die "no summary line in the master's log"
python3 - "$summary" "$MAX_STEPS" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
assert s["status"] == "succeeded", s
assert s["steps"] == int(sys.argv[2]), s
assert s["checkpoint"] and s["checkpoint"].startswith("s3://kubetrain/"), s
print(f"[e2e] summary ok: {s['steps']} steps, train_loss {s['train_loss']:.3f}, checkpoint {s['checkpoint']}")
PY

log "checkpoints in the bucket (a pod with the trainer image and the dev credentials)"
kubectl -n "$NS" delete pod s3-list --ignore-not-found >/dev/null
kubectl -n "$NS" run s3-list --image "$IMAGE" --restart=Never --image-pull-policy=IfNotPresent \
    --overrides='{"spec":{"securityContext":{"runAsNonRoot":true,"runAsUser":1000,"seccompProfile":{"type":"RuntimeDefault"}},
      "containers":[{"name":"s3-list","image":"'"$IMAGE"'","command":["python","-c",
      "import boto3; c=boto3.client(\"s3\",endpoint_url=\"http://seaweedfs:8333\",region_name=\"us-east-1\"); print(\"\\n\".join(o[\"Key\"] for o in c.list_objects_v2(Bucket=\"kubetrain\",Prefix=\"checkpoints/\").get(\"Contents\",[])))"],
      "envFrom":[{"secretRef":{"name":"kubetrain-s3"}}],
      "securityContext":{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]}}}]}}'
kubectl -n "$NS" wait pod/s3-list --for=jsonpath='{.status.phase}'=Succeeded --timeout=3m
keys=$(kubectl -n "$NS" logs s3-list)
grep -q "checkpoints/$EXPERIMENT/step-" <<<"$keys" || die "no checkpoint objects in s3://kubetrain/checkpoints/: $keys"

if [[ "${KUBETRAIN_SKIP_MONITORING:-0}" != "1" ]]; then
    log "series in Prometheus, dashboard in Grafana"
    kubectl -n monitoring port-forward svc/kube-prometheus-stack-prometheus 19090:9090 >/dev/null 2>&1 &
    PF_PID=$!
    kubectl -n monitoring port-forward svc/kube-prometheus-stack-grafana 13000:80 >/dev/null 2>&1 &
    PF_PID="$PF_PID $!"
    sleep 5
    query="count(last_over_time(kubetrain_steps_total{experiment=\"$EXPERIMENT\"}[1h]))"
    curl -fsS --get "http://127.0.0.1:19090/api/v1/query" --data-urlencode "query=$query" \
        | grep -q '"result":\[{' || die "no kubetrain_steps_total series for $EXPERIMENT in Prometheus"
    curl -fsS -u admin:kubetrain-dev "http://127.0.0.1:13000/api/dashboards/uid/kubetrain-training" \
        | grep -q '"uid":"kubetrain-training"' || die "dashboard kubetrain-training not loaded in Grafana"
fi
log "PASSED"
