"""Helpers for the node tier's tests: the tier's values, the CLI against the node, waiting on jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from support import EXAMPLES, REPO, Result, run_cli, tool

QUICKSTART = EXAMPLES / "quickstart.yaml"


def tier_values(*more: str) -> list[str]:
    """What the node tier adds to a user's values: the image it built, and resources that fit 2 cores."""
    repository, _, tag = os.environ["KUBETRAIN_TRAINER_IMAGE"].rpartition(":")
    return ["--set", f"image.repository={repository},image.tag={tag},image.pullPolicy=Never",
            "--set", "resources.cpu=1,resources.memory=3Gi", *more]


def s3_values(endpoint: str, uri: str) -> list[str]:
    return ["--set", f"checkpoint.uri={uri},s3.endpoint={endpoint},s3.credentialsSecret=s3-credentials"]


def kt(node, namespace: str, *args: str, timeout: float = 600) -> Result:
    """`kubetrain ARGS` against the node, as a user with a kubeconfig runs it."""
    return run_cli(*args, "--kubeconfig", str(node.cluster.kubeconfig), "-n", namespace, timeout=timeout)


def kt_background(node, namespace: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", *args, "--kubeconfig", str(node.cluster.kubeconfig),
         "-n", namespace], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def helm(node, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([tool("KUBETRAIN_HELM", "helm"), "--kubeconfig", str(node.cluster.kubeconfig), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def get_json(node, namespace: str, *what: str) -> dict:
    return json.loads(node.cluster.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def job_pods(node, namespace: str, job: str, kind: str = "PyTorchJob") -> list[dict]:
    from trainer.controller.kinds import kind_named

    return get_json(node, namespace, "pods", "-l", kind_named(kind).pod_selector(job))["items"]


def wait_for_state(node, namespace: str, job: str, states: set[str], timeout: float = 600,
                   kind: str = "PyTorchJob") -> dict:
    """Poll the job until `kubetrain status` would report one of `states`; return the job."""
    from trainer.controller.jobs import job_state

    deadline = time.monotonic() + timeout
    job_obj = {}
    while time.monotonic() < deadline:
        got = node.cluster.kubectl("get", kind.lower(), job, "-n", namespace, "-o", "json", check=False)
        if got.returncode == 0:
            job_obj = json.loads(got.stdout)
            if job_state(job_obj) in states:
                return job_obj
        time.sleep(1)
    pods = node.cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = node.cluster.kubectl("get", "events", "-n", namespace, check=False).stdout[-3000:]
    raise AssertionError(f"{kind.lower()}/{job} never reached {states}: {json.dumps(job_obj.get('status'))}\n"
                         f"{pods}\n{events}")


def summary_line(log_text: str, prefix: str = "[master-0] ") -> dict:
    """The JSON summary that rank 0 prints last, from `kubetrain logs` output."""
    lines = [ln[len(prefix):] for ln in log_text.splitlines()
             if ln.startswith(prefix) and '"event": "summary"' in ln]
    assert lines, f"no summary line from {prefix.strip()}:\n{log_text[-3000:]}"
    return json.loads(lines[-1])


def mount_user_code(node, namespace: str, name: str, files: dict[str, str]) -> list[str]:
    """Create ConfigMap `name` from `files` and return the values that mount it on training.pythonPath."""
    node.cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
                        "data": files})
    return ["--set-json", "volumes=" + json.dumps([{"name": "usercode", "configMap": {"name": name}}]),
            "--set-json", "volumeMounts=" + json.dumps([{"name": "usercode", "mountPath": "/opt/usercode",
                                                          "readOnly": True}]),
            "--set-json", 'training.pythonPath=["/opt/usercode"]']


def create_s3_secret(node, namespace: str) -> None:
    from s3server import CREDENTIALS

    node.cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", namespace,
                         *[f"--from-literal={k}={v}" for k, v in CREDENTIALS.items()])


# 768 steps: long enough (about 30 s here) to be preempted after the first periodic checkpoint.
LONG = ["--set", "training.epochs=3,training.data.trainSamples=16384,training.data.evalSamples=512",
        "--set", "checkpoint.everySteps=100,checkpoint.keepLast=20,training.logEverySteps=50"]


def submit_until_first_commit(node, namespace: str, node_s3, bucket: str, name: str, values: list[str],
                              kind: str = "PyTorchJob") -> None:
    """Submit `values` checkpointing to `bucket`; return once the job runs and has committed a step."""
    node_s3.create_bucket(bucket)
    create_s3_secret(node, namespace)
    submitted = kt(node, namespace, "submit", name, *values, *tier_values(),
                   *s3_values(node_s3.endpoint, f"s3://{bucket}/runs"))
    assert submitted.returncode == 0, submitted.stderr
    wait_for_state(node, namespace, name, {"Running"}, kind=kind)
    deadline = time.monotonic() + 300
    while not any(k.endswith("/commit.json") for k in node_s3.keys(bucket, f"runs/{name}/")):
        assert time.monotonic() < deadline, "no checkpoint committed in 300s"
        time.sleep(1)


def assert_resumed_exactly(node, namespace: str, node_s3, bucket: str, name: str, values: list[str],
                           workdir) -> tuple[int, list[int], float]:
    """After a preemption of a LONG run that then succeeded: every rank committed the step SIGTERM
    caught, the resumed pods loaded it, and the final loss equals the same values run uninterrupted
    as local processes, to the digit. Returns (that step, every committed step, the final loss)."""
    # The steps on the 100-step cadence and the final one, plus the one the SIGTERM made every rank commit.
    keys = node_s3.keys(bucket, f"runs/{name}/")
    steps = sorted({int(k.split("/")[2].split("-")[1]) for k in keys if k.endswith("commit.json")})
    (preempted,) = [s for s in steps if s % 100 and s != 768]
    step_dir = f"runs/{name}/step-{preempted:08d}/"
    assert {step_dir + f for f in ("commit.json", "rank-00000.pt", "rank-00001.pt")} <= set(keys), keys
    logs = kt(node, namespace, "logs", name)
    assert f"resumed from s3://{bucket}/{step_dir.rstrip('/')}" in logs.stdout, logs.stdout[-3000:]
    resumed = summary_line(logs.stdout)
    assert resumed["status"] == "succeeded" and resumed["steps"] == 768, resumed

    local = run_cli("run", name, *values, "--workdir", str(workdir), "--set",
                    f"checkpoint.uri=file://{workdir}/ckpt", timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    assert resumed["train_loss"] == local.summary["train_loss"], (resumed, local.summary)
    assert resumed["eval_loss"] == local.summary["eval_loss"], (resumed, local.summary)
    assert_curves_and_model_on_s3(node_s3, bucket, name, resumed, workdir / "tensorboard-from-s3")
    return preempted, steps, resumed["train_loss"]


def assert_curves_and_model_on_s3(node_s3, bucket: str, name: str, summary: dict, folder) -> None:
    """A LONG run, preempted once: rank 0's events of both attempts are on S3, and read as one curve
    with a point per log step (the resumed attempt purged what the first logged after its checkpoint);
    the export's figures are the run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keys = node_s3.keys(bucket, f"runs/{name}/tensorboard/")
    assert len(keys) >= 2 and all(k.endswith(".rank0") for k in keys), keys  # rank 0 only, one file an attempt
    folder.mkdir(parents=True)
    for key in keys:
        node_s3.client().download_file(bucket, key, str(folder / key.rsplit("/", 1)[1]))
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [*range(50, 751, 50), 768]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [256, 512, 768]
    model = json.loads(node_s3.client().get_object(Bucket=bucket, Key=f"runs/{name}/model/model.json")["Body"].read())
    assert (model["step"], model["eval_accuracy"]) == (768, summary["eval_accuracy"]), model
    assert summary["model"] == f"s3://{bucket}/runs/{name}/model", summary
