"""The CLI inside a pod: no kubeconfig, only the pod's ServiceAccount (in-cluster config).

A notebook pod or a CI job runs `kubetrain list` with the token, CA and namespace the
kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount, as client-go's
InClusterConfig does. The node tier has no kube-proxy, so the pod is pointed at the
API server's node address through KUBERNETES_SERVICE_HOST/PORT, the two variables
kube-proxy's Service address would otherwise fill; everything else is what any pod gets.
"""

from __future__ import annotations

import time

import pytest

from kube_node import APISERVER_PORT, NODE_IP
from nodejobs import get_json

pytestmark = pytest.mark.timeout(600)

RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _objects(namespace: str, image: str) -> list[dict]:
    meta = lambda name: {"name": name, "namespace": namespace}  # noqa: E731
    # A suspended PyTorchJob: listed, never run (no pods to wait for).
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
           "metadata": {**meta("probe"), "labels": {"app.kubernetes.io/part-of": "kubetrain"}},
           "spec": {"runPolicy": {"suspend": True}, "pytorchReplicaSpecs": {"Master": {
               "replicas": 1, "restartPolicy": "Never", "template": {"spec": {"containers": [
                   {"name": "pytorch", "image": image, "command": ["true"]}]}}}}}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("lister"),
            "rules": [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["get", "list"]},
                      {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["get", "list"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("lister"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lister"},
               "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": namespace}]}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("lister")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta("cli"), "spec": {
        "serviceAccountName": "lister", "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "cli", "image": image, "imagePullPolicy": "Never", "command": ["kubetrain", "list"],
                        "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": NODE_IP},
                                {"name": "KUBERNETES_SERVICE_PORT", "value": str(APISERVER_PORT)}],
                        "securityContext": RESTRICTED}]}}
    return [account, role, binding, job, pod]


def test_kubetrain_list_in_a_pod_uses_its_service_account(node, node_ns):
    objects = _objects(node_ns, node.assets.trainer_image)
    # The ServiceAccount first: its admission check refuses a pod naming one that does not exist yet.
    node.cluster.apply(objects[:4], namespace=node_ns)
    node.cluster.apply(objects[4], namespace=node_ns)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        phase = get_json(node, node_ns, "pod", "cli")["status"].get("phase")
        if phase in {"Succeeded", "Failed"}:
            break
        time.sleep(2)
    logs = node.cluster.kubectl("logs", "cli", "-n", node_ns, check=False)
    assert phase == "Succeeded", f"pod ended {phase}: {logs.stdout}{logs.stderr}"
    lines = logs.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "NODES", "AGE", "KIND"], logs.stdout
    assert any(line.split()[0] == "probe" and line.split()[-1] == "PyTorchJob" for line in lines[1:]), logs.stdout
    print(logs.stdout)
