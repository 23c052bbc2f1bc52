"""A job's life on a real node: submit and follow it, preempt it, restart it, watch it fail.

Every job runs the trainer image in pods that the real training operator makes,
in a namespace enforcing Pod Security `restricted`.
"""

from __future__ import annotations

import json
import time

import pytest

from nodejobs import (LONG, QUICKSTART, assert_resumed_exactly, job_pods, kt, kt_background,
                      mount_user_code, submit_until_first_commit, summary_line, tier_values, wait_for_state)

# The first test also waits for the node to start (a cold image import takes minutes).
pytestmark = pytest.mark.timeout(1200)

SHORT = ["--set", "training.epochs=1,training.data.trainSamples=2048,training.data.evalSamples=512"]


def test_submit_wait_status_watch_and_logs_follow_started_before_the_pods(node, node_ns):
    values = ["-f", str(QUICKSTART), *tier_values(), *SHORT]
    follow = kt_background(node, node_ns, "logs", "exp-follow", "--follow")  # before the job exists
    time.sleep(2)
    submit = kt_background(node, node_ns, "submit", "exp-follow", *values, "--wait")
    deadline = time.monotonic() + 60
    while node.cluster.kubectl("get", "pytorchjob", "exp-follow", "-n", node_ns, check=False).returncode:
        assert time.monotonic() < deadline and submit.poll() is None, submit.communicate()
        time.sleep(0.2)
    watch = kt_background(node, node_ns, "status", "exp-follow", "--watch")
    running = kt(node, node_ns, "status", "exp-follow")
    assert running.returncode == 3, running.stdout  # not finished yet

    submitted, submit_err = submit.communicate(timeout=600)
    assert submit.returncode == 0, submitted + submit_err
    watched, watch_err = watch.communicate(timeout=60)
    assert watch.returncode == 0, watched + watch_err
    for out in (submitted, watched):  # the operator's real conditions, in order
        states = [ln.split("exp-follow: ", 1)[1] for ln in out.splitlines() if "exp-follow: " in ln]
        assert states[-1] == "Succeeded" and "Running" in states, out
        order = ["Submitted", "Created", "Running", "Succeeded"]
        assert [order.index(s) for s in states] == sorted(order.index(s) for s in states), states
    print("submit --wait:", [ln for ln in submitted.splitlines() if "exp-follow: " in ln])
    print("status --watch:", [ln for ln in watched.splitlines() if "exp-follow: " in ln])

    out, err = follow.communicate(timeout=120)  # ends by itself once both pods ended
    assert follow.returncode == 0, err
    lines = out.splitlines()
    assert any(ln.startswith("[master-0] ") and "step 32/32" in ln for ln in lines), out[-2000:]
    assert any(ln.startswith("[worker-1] ") and "rank=1" in ln for ln in lines), out[-2000:]
    assert summary_line(out)["status"] == "succeeded"


def test_status_says_why_pods_are_pending_from_the_real_scheduler(node, node_ns):
    values = ["-f", str(QUICKSTART), *tier_values(), "--set", "resources.gpu=1"]
    assert kt(node, node_ns, "submit", "exp-gpu", *values).returncode == 0
    deadline = time.monotonic() + 120
    while True:
        status = kt(node, node_ns, "status", "exp-gpu")
        if "Insufficient nvidia.com/gpu" in status.stdout:
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(2)
    assert status.returncode == 3 and "Pending" in status.stdout, status.stdout
    assert kt(node, node_ns, "delete", "exp-gpu").returncode == 0


def test_deleting_the_worker_pod_preempts_commits_and_resumes_to_the_same_loss(node, node_ns, node_s3, tmp_path):
    values = ["-f", str(QUICKSTART), *LONG]
    # Preempt once training is under way and a periodic checkpoint is committed.
    submit_until_first_commit(node, node_ns, node_s3, "preempt", "exp-pre", values)
    pods = {p["metadata"]["labels"]["training.kubeflow.org/replica-type"]: p for p in job_pods(node, node_ns, "exp-pre")}
    first_uids = {kind: p["metadata"]["uid"] for kind, p in pods.items()}
    node.cluster.kubectl("delete", "pod", pods["worker"]["metadata"]["name"], "-n", node_ns, "--wait=false")

    job = wait_for_state(node, node_ns, "exp-pre", {"Succeeded", "Failed"}, timeout=900)
    assert job["status"]["conditions"][-1]["type"] == "Succeeded", json.dumps(job["status"])
    now = {p["metadata"]["labels"]["training.kubeflow.org/replica-type"]: p["metadata"]["uid"]
           for p in job_pods(node, node_ns, "exp-pre")}
    assert now["master"] != first_uids["master"] and now["worker"] != first_uids["worker"], "pods not recreated"
    events = node.cluster.kubectl("get", "events", "-n", node_ns, "-o", "json").stdout
    exits = sorted({e["message"] for e in json.loads(events)["items"] if "exited with code" in e["message"]})
    print("operator events:", exits)
    # The preempted pod's own exit: 143, which restartPolicy ExitCode retries (the operator then
    # restarts every replica; whether it records the master's exit too depends on timing).
    assert any("exp-pre-worker-0 exited with code 143" in m for m in exits), exits
    preempted, steps, loss = assert_resumed_exactly(node, node_ns, node_s3, "preempt", "exp-pre", values, tmp_path)
    print(f"preempted at step {preempted}, committed {steps}; final loss {loss} on the node and uninterrupted")


FLAKY = '''
"""Fails on rank 0's first container start, then trains: a crash the kubelet restarts in place."""
import os, pathlib, sys
from trainer.tasks import get_task


def build(cfg):
    marker = pathlib.Path("/tmp/flaky-first-attempt")  # /tmp is the pod's emptyDir: it outlives the container
    if os.environ.get("RANK") == "0" and not marker.exists():
        marker.write_text("failed once")
        print("flaky: first attempt fails on purpose", flush=True)
        sys.exit(3)
    print("flaky: second attempt trains", flush=True)
    return get_task("cifar10-convnet")(cfg)
'''


def test_a_restarted_replica_shows_its_previous_log_and_restart_count(node, node_ns):
    code = mount_user_code(node, node_ns, "usercode", {"flaky.py": FLAKY})
    values = ["-f", str(QUICKSTART), *tier_values(), *code,
              "--set", "training.task=custom,training.entrypoint=flaky:build,job.restartPolicy=OnFailure"]
    assert kt(node, node_ns, "submit", "exp-flaky", *values).returncode == 0
    # While it trains again, status names the restart and how the last container ended (the
    # kubelet forgets the last state once the pod completes; the count stays).
    deadline, seen = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        status = kt(node, node_ns, "status", "exp-flaky")
        master_line = next((ln for ln in status.stdout.splitlines() if "[master-0]" in ln), "")
        if "restarts 1" in master_line and "last exit code 3 (Error)" in master_line:
            seen = master_line
            break
        assert status.returncode == 3, status.stdout  # finished before we saw the restart
        time.sleep(0.5)
    assert seen, status.stdout
    previous = kt(node, node_ns, "logs", "exp-flaky", "--previous")
    assert previous.returncode == 0, previous.stderr
    assert "[master-0] flaky: first attempt fails on purpose" in previous.stdout, previous.stdout

    wait_for_state(node, node_ns, "exp-flaky", {"Succeeded", "Failed"})
    status = kt(node, node_ns, "status", "exp-flaky")
    assert status.returncode == 0 and "restarts 1" in status.stdout, status.stdout
    current = kt(node, node_ns, "logs", "exp-flaky", "--rank", "0")
    assert "flaky: second attempt trains" in current.stdout and summary_line(current.stdout)["status"] == "succeeded"
    print("status while retrying:", seen.strip())


BROKEN = '''
def build(cfg):
    raise RuntimeError("the model definition is broken")
'''


def test_a_failing_entrypoint_fails_the_job_and_status_names_replica_exit_code_and_reason(node, node_ns):
    code = mount_user_code(node, node_ns, "usercode", {"broken.py": BROKEN})
    values = ["-f", str(QUICKSTART), *tier_values(), *code,
              "--set", "training.task=custom,training.entrypoint=broken:build,job.nodes=1"]
    assert kt(node, node_ns, "submit", "exp-broken", *values).returncode == 0
    wait_for_state(node, node_ns, "exp-broken", {"Failed", "Succeeded"})
    status = kt(node, node_ns, "status", "exp-broken")
    assert status.returncode == 1, status.stdout
    assert "State:      Failed" in status.stdout
    master_line = next(ln for ln in status.stdout.splitlines() if "[master-0]" in ln)
    assert "Failed" in master_line and "exit code 1 (Error)" in master_line, status.stdout
    logs = kt(node, node_ns, "logs", "exp-broken")
    assert "Traceback (most recent call last)" in logs.stdout, logs.stdout[-3000:]
    assert "RuntimeError: the model definition is broken" in logs.stdout
