"""What a TrainJob carries of the settings a PyTorchJob has: through the experiment's own TrainingRuntime
(job.runtime empty) or runtime patches, and never silently dropped (test_chart_tie.py holds the refusals).

The node tier (tests/node/test_node_trainjob.py) shows the same on the real Trainer v2 controller.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from support import helm_objects

pytestmark = pytest.mark.skipif(
    not (os.environ.get("KUBETRAIN_HELM") or shutil.which("helm")),
    reason="helm not found: set KUBETRAIN_HELM or run `eval \"$(scripts/install-test-tools.sh)\"`")

V2 = "job.kind=TrainJob"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def objects(*sets: str) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in helm_objects("exp", sets=[V2, *sets], include_tests=False)}


def node_job(runtime: dict) -> dict:
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]


def test_the_chart_runtime_carries_restarts_backoff_pull_policy_and_scheduling():
    rendered = objects("job.restartPolicy=Never,job.backoffLimit=0,image.pullPolicy=Never",
                       "priorityClassName=training-high,schedulerName=volcano")
    ref = rendered["TrainJob"]["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("TrainingRuntime", "exp")
    runtime = rendered["TrainingRuntime"]
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 2, "torch": {}}
    job = node_job(runtime)
    pod = job["template"]["spec"]
    assert job["backoffLimit"] == 0
    # Never: any non-zero exit fails the Job at once, as a PyTorchJob replica with restartPolicy Never.
    assert job["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onExitCodes": {
        "containerName": "node", "operator": "NotIn", "values": [0]}}]
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"] == [{"name": "node", "image": "kubetrain/trainer:0.1.0", "imagePullPolicy": "Never"}]
    assert (pod["priorityClassName"], pod["schedulerName"]) == ("training-high", "volcano")


@pytest.mark.parametrize("policy,pod_policy,failing", [
    ("ExitCode", "Never", ("In", list(range(1, 128)))),  # 1-127 permanent; >= 128 (hang, preemption) retried
    ("OnFailure", "OnFailure", None),
])
def test_exit_code_and_on_failure_restart_as_the_v1_operator_does(policy, pod_policy, failing):
    job = node_job(objects(f"job.restartPolicy={policy}")["TrainingRuntime"])
    assert job["template"]["spec"]["restartPolicy"] == pod_policy and job["backoffLimit"] == 3
    rules = job.get("podFailurePolicy", {}).get("rules", [])
    assert [(r["onExitCodes"]["operator"], r["onExitCodes"]["values"]) for r in rules] == ([failing] if failing else [])


@pytest.mark.parametrize("runtime", ["", "torch-distributed"])
def test_no_pod_gets_the_api_token_whatever_the_service_account(runtime):
    """serviceAccount.create false: the existing account may mount its token; the chart's pods never do."""
    rendered = objects(f"job.runtime={runtime},serviceAccount.create=false,serviceAccount.name=trainer")
    assert "ServiceAccount" not in rendered
    [patch] = rendered["TrainJob"]["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    if runtime:  # a patch cannot say automountServiceAccountToken: a mount at its path keeps the token out
        assert rendered["TrainJob"]["spec"]["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
        assert {"name": mounts[TOKEN_PATH], "emptyDir": {}} in pod["volumes"]
    else:
        assert TOKEN_PATH not in mounts
        assert node_job(rendered["TrainingRuntime"])["template"]["spec"]["automountServiceAccountToken"] is False


def relabel(rules: list[dict], pod_labels: dict[str, str]) -> dict[str, str]:
    """Prometheus' `replace` relabelling (its default action): an anchored regex, `$1` by default."""
    labels = {f"__meta_kubernetes_pod_label_{re.sub('[^a-zA-Z0-9_]', '_', k)}": v for k, v in pod_labels.items()}
    for rule in rules:
        value = ";".join(labels.get(s, "") for s in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            labels[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$1", r"\1"))
    return {k: v for k, v in labels.items() if not k.startswith("__")}


def test_trainjob_series_carry_replica_labels_as_a_pytorchjobs_do():
    monitor = objects("metrics.podMonitor.enabled=true,job.nprocPerNode=2")["PodMonitor"]["spec"]
    assert "podTargetLabels" not in monitor  # the operator's labels: a TrainJob's pods have none
    assert [e["portNumber"] for e in monitor["podMetricsEndpoints"]] == [9400, 9401]
    for endpoint in monitor["podMetricsEndpoints"]:
        for index, replica in (("0", "master"), ("1", "worker"), ("12", "worker")):
            labels = relabel(endpoint["relabelings"], {"batch.kubernetes.io/job-completion-index": index})
            assert labels == {"training_kubeflow_org_replica_index": index,
                              "training_kubeflow_org_replica_type": replica}
