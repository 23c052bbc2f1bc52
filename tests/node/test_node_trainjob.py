"""The same experiment as a Kubeflow Trainer v2 TrainJob, on the real node.

The real Trainer v2 controller manager renders the TrainJob into a JobSet, the
real JobSet controller makes its Jobs, kube-controller-manager's Job controller
makes the pods, and the kubelet runs the trainer image under torchrun with
only the PET_* variables v2's torch plugin injects.
"""

from __future__ import annotations

import json
import time

import pytest

from nodejobs import (LONG, QUICKSTART, assert_resumed_exactly, get_json, job_pods, kt, kt_background,
                      mount_user_code, submit_until_first_commit, summary_line, tier_values, wait_for_state)
from trainer.controller.jobs import job_state

pytestmark = pytest.mark.timeout(1200)

V2 = ["--set", "job.kind=TrainJob"]
SHORT = ["--set", "training.epochs=1,training.data.trainSamples=2048,training.data.evalSamples=512"]


def test_submit_wait_status_and_logs_follow_a_two_node_trainjob(node, node_ns):
    values = ["-f", str(QUICKSTART), *V2, *tier_values(), *SHORT]
    submit = kt_background(node, node_ns, "submit", "exp-v2", *values, "--wait")
    submitted, submit_err = submit.communicate(timeout=600)
    assert submit.returncode == 0, submitted + submit_err
    assert "trainjob/exp-v2 applied" in submitted
    states = [ln.split("exp-v2: ", 1)[1] for ln in submitted.splitlines() if "exp-v2: " in ln]
    assert states[-1] == "Succeeded" and "Running" in states, submitted
    print("submit --wait:", states)

    pods = job_pods(node, node_ns, "exp-v2", kind="TrainJob")
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"] == "2" and env["PET_MASTER_PORT"] == "29500", env  # set by Trainer v2, not us
    assert env["PET_MASTER_ADDR"] == "exp-v2-node-0-0.exp-v2", env

    status = kt(node, node_ns, "status", "exp-v2")
    assert status.returncode == 0, status.stdout
    assert "Kind:       TrainJob" in status.stdout and "State:      Succeeded" in status.stdout, status.stdout
    assert "[master-0]" in status.stdout and "[worker-1]" in status.stdout, status.stdout
    logs = kt(node, node_ns, "logs", "exp-v2")
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert any(ln.startswith("[master-0] ") and "step 32/32" in ln for ln in lines), logs.stdout[-3000:]
    assert any(ln.startswith("[worker-1] ") and "rank=1" in ln for ln in lines), logs.stdout[-3000:]
    assert summary_line(logs.stdout)["status"] == "succeeded"
    listing = kt(node, node_ns, "list")
    assert any(ln.split()[0] == "exp-v2" and ln.split()[-1] == "TrainJob" for ln in listing.stdout.splitlines()[1:])
    deleted = kt(node, node_ns, "delete", "exp-v2")
    assert deleted.returncode == 0 and "trainjob/exp-v2 deleted" in deleted.stdout, deleted.stdout


def test_a_suspended_trainjob_commits_on_sigterm_and_resumes_to_the_same_loss(node, node_ns, node_s3, tmp_path):
    """Preemption as Kueue does it to a TrainJob: `spec.suspend: true` (JobSet deletes the pods: SIGTERM,
    every rank commits), then `false` (new pods resume from that checkpoint)."""
    values = ["-f", str(QUICKSTART), *V2, *LONG]
    submit_until_first_commit(node, node_ns, node_s3, "preempt-v2", "exp-sus", values, kind="TrainJob")
    first_uids = {p["metadata"]["uid"] for p in job_pods(node, node_ns, "exp-sus", kind="TrainJob")}

    def suspend(flag: bool) -> None:
        node.cluster.kubectl("patch", "trainjob", "exp-sus", "-n", node_ns, "--type=merge",
                             "-p", json.dumps({"spec": {"suspend": flag}}))

    suspend(True)
    wait_for_state(node, node_ns, "exp-sus", {"Suspended"}, timeout=120, kind="TrainJob")
    deadline = time.monotonic() + 120
    while job_pods(node, node_ns, "exp-sus", kind="TrainJob"):
        assert time.monotonic() < deadline, "the suspended TrainJob's pods are still there after 120s"
        time.sleep(1)
    status = kt(node, node_ns, "status", "exp-sus")
    assert status.returncode == 3 and "State:      Suspended" in status.stdout, status.stdout
    suspend(False)

    job = wait_for_state(node, node_ns, "exp-sus", {"Succeeded", "Failed"}, timeout=900, kind="TrainJob")
    assert job_state(job) == "Succeeded", json.dumps(job["status"])
    now_uids = {p["metadata"]["uid"] for p in job_pods(node, node_ns, "exp-sus", kind="TrainJob")}
    assert now_uids and not now_uids & first_uids, "pods not recreated"
    preempted, steps, loss = assert_resumed_exactly(node, node_ns, node_s3, "preempt-v2", "exp-sus", values, tmp_path)
    print(f"suspended at step {preempted}, committed {steps}; final loss {loss} on the node and uninterrupted")


BAD_CONFIG = '''
from trainer.errors import UserError


def build(cfg):
    raise UserError("training.options.layers: this model needs at least one layer")
'''


def test_a_bad_config_exit_2_fails_a_never_restarting_trainjob_at_once(node, node_ns):
    """job.restartPolicy: Never and image.pullPolicy reach the pod through the experiment's own
    TrainingRuntime: an exit 2 fails the TrainJob with no restart and no second pod."""
    code = mount_user_code(node, node_ns, "usercode", {"badconfig.py": BAD_CONFIG})
    values = ["-f", str(QUICKSTART), *V2, *tier_values(), *code,  # tier_values: image.pullPolicy=Never
              "--set", "training.task=custom,training.entrypoint=badconfig:build,job.nodes=1",
              "--set", "job.restartPolicy=Never,job.backoffLimit=3"]
    assert kt(node, node_ns, "submit", "exp-never", *values).returncode == 0
    job = wait_for_state(node, node_ns, "exp-never", {"Failed", "Succeeded"}, timeout=300, kind="TrainJob")
    assert job_state(job) == "Failed", json.dumps(job["status"])
    [pod] = job_pods(node, node_ns, "exp-never", kind="TrainJob")  # backoffLimit 3, yet no second pod
    [container] = pod["status"]["containerStatuses"]
    assert container["restartCount"] == 0 and container["state"]["terminated"]["exitCode"] == 2, container
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["containers"][0]["imagePullPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert not any("serviceaccount" in m["mountPath"] for m in spec["containers"][0]["volumeMounts"])
    [child] = get_json(node, node_ns, "jobs", "-l", "jobset.sigs.k8s.io/jobset-name=exp-never")["items"]
    assert child["status"].get("failed") == 1, child["status"]
    assert any(c["type"] == "Failed" and c.get("reason") == "PodFailurePolicy"
               for c in child["status"]["conditions"]), child["status"]
    status = kt(node, node_ns, "status", "exp-never")
    assert status.returncode == 1 and "exit code 2" in status.stdout, status.stdout
