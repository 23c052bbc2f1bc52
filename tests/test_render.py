"""`kubetrain render`: what users see on stdout and stderr; the manifests are the chart's, rendered by helm.

The quickstart rendering is kept as a golden file so that a template change
shows up as a reviewable diff. Regenerate it after an intended change with:
    KUBETRAIN_UPDATE_GOLDEN=1 python -m pytest tests/test_render.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from support import EXAMPLES, run_cli

pytestmark = pytest.mark.skipif(
    not (os.environ.get("KUBETRAIN_HELM") or shutil.which("helm")),
    reason="helm not found: set KUBETRAIN_HELM or run `eval \"$(scripts/install-test-tools.sh)\"`")

GOLDEN = Path(__file__).resolve().parent / "golden" / "quickstart.yaml"


def rendered(*args: str) -> dict[tuple[str, str], dict]:
    result = run_cli("render", *args)
    assert result.returncode == 0, result.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}


def trainer_container(objects: dict, name: str, replica: str = "Master") -> dict:
    spec = objects[("PyTorchJob", name)]["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
    return spec["containers"][0]


def test_quickstart_matches_the_golden_file():
    result = run_cli("render", "quickstart", "-f", str(EXAMPLES / "quickstart.yaml"))
    assert result.returncode == 0, result.stderr
    if os.environ.get("KUBETRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(result.stdout, encoding="utf-8")
    assert result.stdout == GOLDEN.read_text(encoding="utf-8"), (
        "the quickstart rendering changed; review `git diff` after KUBETRAIN_UPDATE_GOLDEN=1 pytest tests/test_render.py")


def test_quickstart_is_one_master_one_worker_with_the_trainer_config():
    objects = rendered("quickstart", "-f", str(EXAMPLES / "quickstart.yaml"))
    job = objects[("PyTorchJob", "quickstart")]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 1}
    assert replicas["Master"]["restartPolicy"] == "ExitCode" and job["spec"]["runPolicy"]["backoffLimit"] == 3
    container = trainer_container(objects, "quickstart")
    assert container["name"] == "pytorch"
    assert container["command"] == ["python", "-m", "trainer", "--config", "/etc/kubetrain/config.json"]
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container["ports"]
    config = json.loads(objects[("ConfigMap", "quickstart-config")]["data"]["config.json"])
    assert config["experiment"] == "quickstart" and config["training"]["batchSize"] == 32
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == labels["kubetrain.io/experiment"] == "quickstart"


def test_one_node_has_no_worker_and_many_processes_use_torchrun():
    objects = rendered("solo", "--set", "job.nodes=1,job.nprocPerNode=4,resources.gpu=4")
    job = objects[("PyTorchJob", "solo")]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"] and job["spec"]["nprocPerNode"] == "4"
    container = trainer_container(objects, "solo")
    assert container["command"][:3] == ["python", "-m", "trainer.worker.launch"]
    assert [p["name"] for p in container["ports"]] == ["pytorchjob-port", "metrics", "metrics-1", "metrics-2",
                                                       "metrics-3"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert [p["port"] for p in objects[("Service", "solo-metrics")]["spec"]["ports"]] == [9400, 9401, 9402, 9403]


def test_elastic_jobs_rendezvous_on_the_master():
    objects = rendered("stretch", "--set", "job.nodes=3,job.elastic.enabled=true,job.elastic.maxNodes=5")
    policy = objects[("PyTorchJob", "stretch")]["spec"]["elasticPolicy"]
    assert policy == {"rdzvBackend": "c10d", "rdzvHost": "stretch-master-0", "rdzvPort": 23456,
                      "minReplicas": 1, "maxReplicas": 5, "maxRestarts": 3}
    assert trainer_container(objects, "stretch", "Worker")["command"][:3] == ["python", "-m", "trainer.worker.launch"]


def test_s3_credentials_only_through_the_secret():
    objects = rendered("dev", "--set", "s3.devSecret.enabled=true,s3.devSecret.accessKeyId=AKIDEV",
                       "--set", "s3.devSecret.secretAccessKey=sekret,checkpoint.uri=s3://bucket/runs")
    config_text = objects[("ConfigMap", "dev-config")]["data"]["config.json"]
    assert "sekret" not in config_text and "AKIDEV" not in config_text and "devSecret" not in config_text
    assert objects[("Secret", "dev-s3-dev")]["stringData"]["AWS_SECRET_ACCESS_KEY"] == "sekret"
    env = {e["name"]: e for e in trainer_container(objects, "dev")["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "dev-s3-dev",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}


def test_pods_are_hardened_and_stay_out_of_the_mesh():
    objects = rendered("safe")
    template = objects[("PyTorchJob", "safe")]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    spec, container = template["spec"], template["spec"]["containers"][0]
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert spec["automountServiceAccountToken"] is False and spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory" and "/tmp" in mounts
    assert objects[("ServiceAccount", "safe")]["automountServiceAccountToken"] is False


def test_skip_tests_leaves_out_the_helm_test_pod():
    assert ("Pod", "plain-test") in rendered("plain")
    assert ("Pod", "plain-test") not in rendered("plain", "--skip-tests")


def test_bad_names_and_values_exit_2_with_one_clear_line():
    for args, expected in [
        (["Bad_Name"], 'experiment name "Bad_Name" must be a DNS-1035 label'),
        (["a" * 53, "--set", "job.nodes=1000"], "would exceed 63 characters"),
        (["ok", "--set", "job.nodes=0"], "job.nodes: 0 is less than the minimum of 1"),
        (["ok", "-f", "missing.yaml"], "missing.yaml: values file not found"),
    ]:
        result = run_cli("render", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
