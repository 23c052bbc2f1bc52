"""Goodput across faults (trainer/worker/goodput.py): the account's resume rules on a real file store, and
2-rank local runs, uninterrupted, preempted once (SIGTERM) and SIGKILLed once, each resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support import FAST_TRAINING, REPO, finish, read_until
from test_tensorboard_export import scalars
from trainer.storage import FileStore
from trainer.worker.goodput import LOSSES, Goodput, heartbeat_key


def _attempt(tmp_path, start: float) -> Goodput:
    return Goodput(start, FileStore(tmp_path.as_uri()), heartbeat_key("exp", 0))


def test_a_clean_preemption_loses_nothing_a_later_heartbeat_is_lost_work_none_is_between_attempts(tmp_path):
    first = _attempt(tmp_path, 1000.0)
    first.add("startup", 5.0)
    first.step(3.0, 1.0)  # 2 s productive, 1 s data wait
    saved = {**first.state(8), "time": 1011.0}  # the checkpoint of step 8, taken at t=1011

    # Preempted right after that save: its heartbeat at step 8 is newer than the save, taken whole.
    first.add("checkpoint_stall", 0.5)
    first.store.write_bytes(first.key, json.dumps({**first.state(8), "time": 1012.0}).encode())
    clean = _attempt(tmp_path, 1020.0)
    clean.add("startup", 4.0)
    clean.resumed(saved, 8)
    assert clean.first_start == 1000.0 and clean.productive == 2.0
    assert clean.losses["checkpoint_stall"] == 0.5 and clean.losses["lost_work"] == 0.0
    assert clean.losses["startup"] == 9.0 and clean.losses["between_attempts"] == 8.0  # 1012 -> 1020

    # Killed after a log step past the checkpoint: the steps after it are lost work.
    first.step(2.0, 0.0)
    first.store.write_bytes(first.key, json.dumps({**first.state(12), "time": 1015.0}).encode())
    killed = _attempt(tmp_path, 1020.0)
    killed.resumed(saved, 8)
    assert killed.productive == 2.0  # the steps after the checkpoint are not kept
    assert killed.losses["lost_work"] == 4.0 and killed.losses["between_attempts"] == 5.0
    report = killed.report(now=1030.0)
    assert report["wall"] == 30.0 and report["goodput"] == pytest.approx(2.0 / 30.0)
    assert report["productive"] + sum(report["losses"].values()) == pytest.approx(30.0)

    # No heartbeat at all (killed before its first log step): from the save on it is between attempts.
    first.store.delete([first.key])
    blind = _attempt(tmp_path, 1020.0)
    blind.resumed(saved, 8)
    assert blind.losses["lost_work"] == 0.0 and blind.losses["between_attempts"] == 9.0

    # A checkpoint from before goodput was kept: the experiment counts from this attempt's start.
    old = _attempt(tmp_path, 1020.0)
    old.resumed(None, 8)
    assert old.first_start == 1020.0 and not any(old.losses.values())


class RefusingStore(FileStore):
    """A real local store whose writes fail, as an unreachable bucket's do after s3.retrySeconds."""

    writes = 0

    def write_bytes(self, key: str, data: bytes) -> None:
        RefusingStore.writes += 1
        raise OSError("connection refused")


def test_heartbeats_reach_the_store_and_a_failing_store_stops_them_with_one_warning(tmp_path, caplog):
    account = _attempt(tmp_path, time.time())
    account.step(1.0, 0.25)
    account.heartbeat(4)  # beside training
    account._writing.join()
    assert json.loads(account.store.read_bytes(account.key))["step"] == 4
    account.heartbeat(8, wait=True)
    assert json.loads(account.store.read_bytes(account.key)) == {**account.state(8), "time": pytest.approx(
        time.time(), abs=5)}

    failing = Goodput(time.time(), RefusingStore(tmp_path.as_uri()), heartbeat_key("exp", 1))
    failing.heartbeat(4, wait=True)  # no exception: goodput never stops training
    failing.heartbeat(8, wait=True)
    failing.heartbeat(12)
    assert RefusingStore.writes == 1 and failing.store is None
    assert caplog.text.count("cannot write the heartbeat") == 1 and "Traceback" not in caplog.text


STEPS, EVERY = 48, 16  # checkpoints at 16, 32, 48; log lines (and heartbeats) every 4 steps
RUN = [*FAST_TRAINING, "--set", f"training.maxSteps={STEPS},training.epochs=3,training.logEverySteps=4",
       "--set", f"checkpoint.everySteps={EVERY},metrics.enabled=false",
       "--set", "job.restartPolicy=ExitCode,job.backoffLimit=1"]
WORKER = r"^\[master-0\] 1 +0 +1 +worker-1 +\S+ +(\d+)"


def _run(tmp_path, name: str, fault: signal.Signals | None) -> dict:
    workdir = tmp_path / name
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", "run", name, "--workdir", str(workdir), *RUN,
         "--set", f"checkpoint.uri={(workdir / 'ckpt').as_uri()}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    if fault is not None:
        m, lines = read_until(proc, WORKER)
        _, more = read_until(proc, rf"step {EVERY + 4}/")  # a log step after the checkpoint of step 16
        lines += more
        os.kill(int(m.group(1)), fault)
    result = finish(proc, lines)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = result.summary
    assert summary["status"] == "succeeded" and summary["restarts"] == (0 if fault is None else 1)
    assert "goodput " in result.stdout  # the log line at the end
    curves, _ = scalars(workdir / "tensorboard")  # rank 0's events, every attempt's
    step, ratio = curves["goodput/ratio"][-1]
    assert step == STEPS and ratio == pytest.approx(summary["goodput"], abs=0.02), (curves["goodput/ratio"], summary)
    summary["tensorboard_losses"] = {tag.rsplit("/", 1)[1]: points[-1][1] for tag, points in curves.items()
                                     if tag.startswith("goodput/loss_seconds/")}
    return summary


@pytest.mark.slow
def test_goodput_drops_with_a_preemption_and_a_kill_and_the_named_losses_explain_it(tmp_path):
    runs = {name: _run(tmp_path, name, fault) for name, fault in
            (("steady", None), ("preempted", signal.SIGTERM), ("killed", signal.SIGKILL))}
    for name, s in runs.items():
        print(name, {k: s[k] for k in ("goodput", "experiment_seconds", "productive_seconds", "goodput_losses")})
        named = sum(s["goodput_losses"][reason] for reason in LOSSES)
        # The named losses account for the wall time that was not productive, within 5%.
        unproductive = s["experiment_seconds"] - s["productive_seconds"]
        assert named == pytest.approx(unproductive, rel=0.05), (name, s)
        assert s["goodput"] == pytest.approx(s["productive_seconds"] / s["experiment_seconds"], abs=1e-3)
        # The experiment spans every attempt: it is longer than the last attempt alone.
        assert s["experiment_seconds"] > s["wall_seconds"], (name, s)
    steady, preempted, killed = runs["steady"], runs["preempted"], runs["killed"]
    assert steady["goodput_losses"]["between_attempts"] == 0 and steady["goodput_losses"]["lost_work"] == 0
    assert preempted["goodput"] < steady["goodput"] and killed["goodput"] < steady["goodput"], runs
    # A preemption commits where it stops: nothing is lost, but a second start-up and the gap are paid.
    assert preempted["goodput_losses"]["lost_work"] == 0, preempted
    assert preempted["goodput_losses"]["between_attempts"] > 0, preempted
    assert preempted["goodput_losses"]["startup"] > steady["goodput_losses"]["startup"], runs
    # A kill after a log step past the checkpoint of step 16 loses that work; the resume redoes it.
    assert killed["goodput_losses"]["lost_work"] > 0, killed
    assert killed["tensorboard_losses"]["lost_work"] == pytest.approx(killed["goodput_losses"]["lost_work"], abs=0.01)
    assert killed["goodput_losses"]["between_attempts"] > 0, killed
    assert killed["goodput_losses"]["startup"] > steady["goodput_losses"]["startup"], runs
