"""#32 item 1 on a real API server: `kubetrain submit --dry-run` refuses every pod-level mistake of
tests/test_pod_values.py before anything is applied, dry-runs the Pod each replica becomes so the
server's own pod validation has its say, and the vendored Kubernetes types are what the server serves.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from support import REPO, run_cli
from test_pod_values import ACCEPTED, REFUSED

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def shared_namespace(apiserver):
    """One namespace for every case: each is refused before anything reaches it."""
    name = "pod-values"
    apiserver.kubectl("create", "namespace", name)
    yield name
    apiserver.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def submit_dry_run(apiserver, namespace, tmp_path, values: dict, name: str = "pod-values"):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return run_cli("submit", name, "-f", str(path), "--dry-run", "--kubeconfig", str(apiserver.kubeconfig),
                   "-n", namespace)


def nothing_applied(apiserver, namespace) -> bool:
    listing = apiserver.kubectl("get", "pytorchjobs,configmaps,serviceaccounts,pods", "-n", namespace,
                                "-o", "name")
    return [line for line in listing.stdout.split() if line != "configmap/kube-root-ca.crt"] == []


def test_vendored_types_are_what_the_server_serves(apiserver):
    sys.path.insert(0, str(REPO / "tools"))
    import k8s_openapi

    openapi = json.loads(apiserver.kubectl("get", "--raw", "/openapi/v3/api/v1").stdout)
    version = json.loads(apiserver.kubectl("get", "--raw", "/version").stdout)["gitVersion"]
    assert k8s_openapi.document(openapi, version) == json.loads(k8s_openapi.OUT.read_text()), \
        "run `python tools/k8s_openapi.py`, then `python -m trainer.values_codegen`"


@pytest.mark.parametrize("values,key", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_submit_dry_run_refuses_before_anything_is_applied(apiserver, shared_namespace, tmp_path, values, key):
    result = submit_dry_run(apiserver, shared_namespace, tmp_path, values)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{key}:" in result.stderr, result.stderr
    assert nothing_applied(apiserver, shared_namespace)


# What passes the schema and the chart's checks and only the API server's pod validation refuses:
# (id, values, the key the refusal names).
SERVER_ONLY = [
    ("affinity-In-without-values", {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In"}]}]}}}},
     "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0]"
     ".values"),
    ("env-fieldPath-unknown", {"env": [{"name": "A", "value": "1"}, {"name": "POD", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.nonsense"}}}]}, "env[1].valueFrom.fieldRef.fieldPath"),
    ("volume-defaultMode-too-big", {"volumes": [{"name": "c", "configMap": {"name": "c", "defaultMode": 4096}}]},
     "volumes[0].configMap.defaultMode"),
    ("mount-subPath-escapes", {"volumes": [{"name": "c", "emptyDir": {}}],
                               "volumeMounts": [{"name": "c", "mountPath": "/c", "subPath": "../x"}]},
     "volumeMounts[0].subPath"),
    ("pod-security-context-typo", {"podSecurityContext": {"runAsUsr": 1000}}, "podSecurityContext.runAsUsr"),
]


@pytest.mark.parametrize("values,key", [c[1:] for c in SERVER_ONLY], ids=[c[0] for c in SERVER_ONLY])
def test_the_servers_pod_validation_runs_before_the_job_exists(apiserver, shared_namespace, tmp_path, values, key):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    assert run_cli("render", "pod-values", "-f", str(path)).returncode == 0  # only the server knows
    result = submit_dry_run(apiserver, shared_namespace, tmp_path, values)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and message.removeprefix("Error: ").split(": ", 1)[0] == key, message
    assert "API server refuses the Master pod" in message, message
    assert nothing_applied(apiserver, shared_namespace)


@pytest.mark.parametrize("values", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_valid_values_pass_the_pod_dry_run(apiserver, shared_namespace, tmp_path, values):
    result = submit_dry_run(apiserver, shared_namespace, tmp_path, values)
    assert result.returncode == 0, result.stderr
    assert "pod/pod-values-master-0 (Master) valid (server dry run)" in result.stdout
    assert "pod/pod-values-worker-0 (Worker) valid (server dry run)" in result.stdout


def test_a_trainjobs_pod_is_dry_run_too(apiserver, shared_namespace, tmp_path):
    apiserver.require_trainer_crds()
    ok = submit_dry_run(apiserver, shared_namespace, tmp_path, {"job": {"kind": "TrainJob"}})
    assert ok.returncode == 0 and "pod/pod-values-node-0-0 (node) valid (server dry run)" in ok.stdout, ok.stderr
    bad = submit_dry_run(apiserver, shared_namespace, tmp_path, {"job": {"kind": "TrainJob"}, **SERVER_ONLY[3][1]})
    assert bad.returncode == 2 and bad.stderr.startswith("Error: volumeMounts[0].subPath: "), bad.stderr
    assert nothing_applied(apiserver, shared_namespace)
