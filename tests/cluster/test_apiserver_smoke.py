"""Smoke tests of the cluster tier itself: a real kube-apiserver with the PyTorchJob CRD."""

import json

import pytest

pytestmark = pytest.mark.cluster


def pytorchjob(name: str, replicas=1) -> dict:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": replicas,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [{
                        "name": "pytorch",
                        "image": "kubetrain/trainer:test",
                        "command": ["python", "-m", "trainer", "--config", "/etc/kubetrain/config.yaml"],
                    }]}},
                },
            },
        },
    }


def test_apiserver_answers(apiserver):
    version = json.loads(apiserver.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["major"] == "1"
    assert apiserver.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    assert apiserver.server.startswith("https://127.0.0.1:")


def test_pytorchjob_crd_is_established(apiserver):
    crd = json.loads(apiserver.kubectl("get", "crd", "pytorchjobs.kubeflow.org", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True"
    assert "v1" in [v["name"] for v in crd["spec"]["versions"] if v.get("served")]


def test_valid_pytorchjob_accepted_by_server_side_dry_run(apiserver, namespace):
    result = apiserver.apply(pytorchjob("smoke"), namespace=namespace, dry_run=True)
    assert "pytorchjob.kubeflow.org/smoke serverside-applied (server dry run)" in result.stdout
    # A dry run stores nothing.
    listed = apiserver.kubectl("get", "pytorchjobs", "-n", namespace, "-o", "name").stdout
    assert listed.strip() == ""


def test_wrongly_typed_pytorchjob_rejected(apiserver, namespace):
    result = apiserver.apply(pytorchjob("smoke-bad", replicas="two"), namespace=namespace,
                             dry_run=True, check=False)
    assert result.returncode != 0
    assert ".spec.pytorchReplicaSpecs.Master.replicas" in result.stderr, result.stderr
    assert "numeric" in result.stderr or "integer" in result.stderr, result.stderr


def test_non_admin_user_cannot_read_secrets(apiserver, namespace):
    alice = apiserver.user_kubeconfig("alice")
    can = apiserver.kubectl("auth", "can-i", "list", "secrets", "-n", namespace,
                            kubeconfig=alice, check=False)
    assert can.stdout.strip() == "no"
    denied = apiserver.kubectl("get", "secrets", "-n", namespace, kubeconfig=alice, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and '"alice"' in denied.stderr, denied.stderr
    # The admin may.
    assert apiserver.kubectl("auth", "can-i", "list", "secrets", "-n", namespace).stdout.strip() == "yes"
