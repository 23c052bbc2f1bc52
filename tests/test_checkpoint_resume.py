"""Checkpoint, preemption and resume: 2 gloo ranks via `kubetrain run` against a real S3 server process."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from support import REPO
from s3server import S3Server

BUCKET = "ckpt"
STEPS, EVERY = 40, 8
BASE = [
    "--set", "training.data.trainSamples=1024,training.data.evalSamples=256,training.batchSize=32",
    "--set", f"training.epochs=3,training.maxSteps={STEPS},training.logEverySteps=8",
    "--set", "training.stepLogFile=steps.jsonl,metrics.enabled=false",
    "--set", f"checkpoint.everySteps={EVERY},checkpoint.keepLast=2",
    "--set", "job.nodes=2,job.restartPolicy=ExitCode,job.backoffLimit=2",
]


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket(BUCKET)
    return s3_server


class Run:
    """`kubetrain run` as a live process whose output lines are collected as they come."""

    def __init__(self, name: str, workdir: Path, s3: S3Server, *args: str, env: dict | None = None):
        self.workdir, self.lines = workdir, []
        cmd = [sys.executable, "-m", "trainer.controller.cli", "run", name, "--workdir", str(workdir), *BASE,
               "--set", f"checkpoint.uri=s3://{BUCKET}/runs,s3.endpoint={s3.endpoint}", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **s3.env, "OMP_NUM_THREADS": "1", **(env or {})})
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait(self, timeout: float = 150) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)

    def pid_of(self, replica: str, timeout: float = 60) -> int:
        """The trainer's pid, from the rank table that rank 0 logs at start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(rf"\s{replica}\s+\S+\s+(\d+)\s+cpu", line)
                if match:
                    return int(match.group(1))
            time.sleep(0.05)
        raise AssertionError(f"no rank table row for {replica}:\n{''.join(self.lines)}")

    def step_losses(self) -> dict[int, float]:
        """The step log; after a resume the re-run steps overwrite the earlier lines."""
        path = self.workdir / "steps.jsonl"
        if not path.exists():
            return {}
        return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def committed_steps(s3: S3Server, experiment: str) -> list[int]:
    keys = s3.keys(BUCKET, f"runs/{experiment}/")
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"step-(\d{8})/commit\.json$", k)))


def final_model(s3: S3Server, experiment: str) -> dict:
    body = s3.client().get_object(Bucket=BUCKET, Key=f"runs/{experiment}/step-{STEPS:08d}/model.pt")["Body"]
    return torch.load(io.BytesIO(body.read()), weights_only=True)


@pytest.mark.slow
def test_sigterm_on_one_rank_then_resume_is_exact(s3, tmp_path):
    # Reference: uninterrupted, with async saves (saving must not change training).
    ref = Run("exact-ref", tmp_path / "ref", s3, "--set", "checkpoint.asyncSave=true")
    code, out = ref.wait()
    assert code == 0, out
    reference = ref.step_losses()
    assert sorted(reference) == list(range(1, STEPS + 1))
    # Retention: exactly keepLast committed steps remain, the newest ones.
    assert committed_steps(s3, "exact-ref") == [STEPS - EVERY, STEPS]

    run = Run("exact-pre", tmp_path / "pre", s3)
    worker = run.pid_of("worker-1")
    while len(run.step_losses()) < 10:  # mid-epoch (32 steps per epoch)
        assert run.proc.poll() is None, "".join(run.lines)
        time.sleep(0.02)
    os.kill(worker, signal.SIGTERM)  # only one rank is told; both must stop at the same step
    code, out = run.wait()
    assert code == 0, out
    assert "exited 143 (retryable): restart 1/2 of every replica, from the checkpoint of step " in out, out
    resumed = [int(m) for m in re.findall(r"resumed from \S+/step-(\d+)", out)]
    assert len(resumed) == 1 and 10 <= resumed[0] < STEPS, out
    # The first attempt's summary (preempted) reached the runner, which prints one summary, its own.
    assert out.count('{"event": "summary"') == 1 and '"status": "preempted"' not in out, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["restarts"] == 1
    assert summary["checkpoint"] == f"s3://{BUCKET}/runs/exact-pre/step-{STEPS:08d}"

    losses = run.step_losses()
    after = {s: losses[s] for s in range(resumed[0] + 1, STEPS + 1)}
    assert after == {s: reference[s] for s in after}  # bit-exact: same floats, not approximately
    a, b = final_model(s3, "exact-ref"), final_model(s3, "exact-pre")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill9_during_a_save_never_commits_a_partial_step(s3, tmp_path):
    held = tmp_path / f"hold-{2 * EVERY}"  # ranks wait before committing step 16 while it exists
    held.write_text("")
    run = Run("killed", tmp_path / "k", s3, "--set", "training.maxSteps=24",
              env={"KUBETRAIN_TEST_PAUSE_BEFORE_COMMIT_WHILE": str(tmp_path / "hold-{step}")})
    worker = run.pid_of("worker-1")
    partial = f"runs/killed/step-{2 * EVERY:08d}/"
    while f"{partial}rank-00001.pt" not in s3.keys(BUCKET, partial):  # step 16's files written, not committed
        assert run.proc.poll() is None, "".join(run.lines)
        time.sleep(0.05)
    assert committed_steps(s3, "killed") == [EVERY]
    os.kill(worker, signal.SIGKILL)  # while it waits at the gate: step 16 can never be committed
    held.unlink()  # the restarted attempt commits without waiting
    code, out = run.wait()
    assert code == 0, out
    assert "exited 137 (retryable)" in out, out
    assert f"ignoring incomplete steps [{2 * EVERY}]" in out, out
    assert re.search(rf"resumed from \S+/step-{EVERY:08d}", out), out
    assert committed_steps(s3, "killed") == [2 * EVERY, 3 * EVERY]


def test_a_bit_flipped_newest_step_is_skipped_and_the_run_ends_as_an_uninterrupted_one(s3, tmp_path):
    """Same size, other bytes (bit rot): the SHA-256 in commit.json catches it; resume: auto warns,
    resumes from the intact step before, and the final model equals an uninterrupted run's."""
    code, out = Run("rot", tmp_path / "first", s3, "--set", "training.maxSteps=24").wait()
    assert code == 0, out[-3000:]
    assert committed_steps(s3, "rot") == [16, 24]
    key = "runs/rot/step-00000024/model.pt"
    data = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    commit = json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/rot/step-00000024/commit.json")["Body"]
                        .read())
    assert commit["files"]["model.pt"] == len(data) and len(commit["sha256"]["model.pt"]) == 64

    code, out = Run("rot", tmp_path / "again", s3).wait()
    assert code == 0, out[-3000:]
    assert "skipping committed step 24" in out and "model.pt fails its SHA-256 check" in out, out[-3000:]
    assert "resumed from s3://ckpt/runs/rot/step-00000016 (step 16" in out, out[-3000:]
    code, straight = Run("straight", tmp_path / "straight", s3).wait()
    assert code == 0, straight[-3000:]
    resumed, uninterrupted = final_model(s3, "rot"), final_model(s3, "straight")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    print(next(ln for ln in out.splitlines() if "skipping committed step" in ln))


def test_an_explicit_step_that_fails_verification_exits_2_with_the_reason(s3, tmp_path):
    code, out = Run("rot-named", tmp_path / "first", s3, "--set", "training.maxSteps=16").wait()
    assert code == 0, out[-3000:]
    key = "runs/rot-named/step-00000016/train.pt"
    s3.client().delete_object(Bucket=BUCKET, Key=key)
    code, out = Run("rot-named", tmp_path / "again", s3, "--set", "checkpoint.resume=16").wait()
    assert code == 2, out[-3000:]
    assert "checkpoint.resume: 16:" in out and "train.pt is missing or has the wrong size" in out, out[-3000:]
