"""Checkpoint safety as users meet it: one process, `kubetrain run`, file:// and s3:// stores."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from fixtures.tasks_helpers import SINGLE, in_process_trainer
from support import finish, read_until, run_cli, start_run
from tests.s3server import CREDENTIALS, SlowDownProxy, free_port
from trainer.errors import RetryableError
from trainer.worker.checkpoint import CheckpointManager
from trainer.storage import FileStore

FAST = [
    "--set", "job.nodes=1,job.backoffLimit=0,metrics.enabled=false",
    "--set", "training.data.trainSamples=256,training.data.evalSamples=64,training.batchSize=32",
    "--set", "training.maxSteps=4,training.epochs=1,checkpoint.everySteps=2",
]
ENV = {"OMP_NUM_THREADS": "1"}


def train(tmp_path, name: str, *extra: str):
    uri = (tmp_path / "store").as_uri()
    return run_cli("run", name, "--workdir", str(tmp_path / name), *FAST, "--set", f"checkpoint.uri={uri}",
                   *extra, env=ENV)


class RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path):
    first = train(tmp_path, "evil")
    assert first.returncode == 0, first.stdout + first.stderr
    step = tmp_path / "store" / "evil" / "step-00000004"
    marker = tmp_path / "pwned"
    torch.save({"weight": RunsCodeWhenUnpickled(str(marker))}, step / "model.pt")
    commit = json.loads((step / "commit.json").read_text())  # a consistent, committed step, checksum too
    commit["files"]["model.pt"] = (step / "model.pt").stat().st_size
    commit["sha256"]["model.pt"] = hashlib.sha256((step / "model.pt").read_bytes()).hexdigest()
    (step / "commit.json").write_text(json.dumps(commit))

    named = train(tmp_path, "evil", "--set", "training.maxSteps=6,checkpoint.resume=4")
    assert named.returncode == 2, named.stdout
    assert "refusing to load" in named.stdout and "step-00000004/model.pt" in named.stdout
    assert "Traceback" not in named.stdout
    # resume: auto skips it, says why, and resumes from the step before.
    again = train(tmp_path, "evil", "--set", "training.maxSteps=6")
    assert again.returncode == 0, again.stdout
    assert "skipping committed step 4" in again.stdout and "refusing to load" in again.stdout, again.stdout
    assert "resumed from" in again.stdout and "step-00000002 (step 2" in again.stdout, again.stdout
    assert not marker.exists()  # nothing ran


def test_config_hash_mismatch_is_refused_unless_forced(tmp_path):
    assert train(tmp_path, "hashed").returncode == 0
    changed = train(tmp_path, "hashed", "--set", "training.seed=7,training.maxSteps=6")
    assert changed.returncode == 2
    message = changed.summary["error"]
    assert "different config" in message and "training.seed: 1234 -> 7" in message
    assert "checkpoint.force" in message

    forced = train(tmp_path, "hashed", "--set", "training.seed=7,training.maxSteps=6,checkpoint.force=true")
    assert forced.returncode == 0, forced.stdout
    assert "resumed from" in forced.stdout and forced.summary["steps"] == 6
    committed = sorted(p.parent.name for p in (tmp_path / "store" / "hashed").glob("step-*/commit.json"))
    assert committed == ["step-00000002", "step-00000004", "step-00000006"]  # keepLast=3


@pytest.fixture
def failing_endpoint():
    """An S3 endpoint that takes connections and answers every request 503 SlowDown."""
    proxy = SlowDownProxy()
    yield proxy.endpoint
    proxy.close()


def test_resume_auto_with_the_store_failing_is_a_retryable_exit(tmp_path, failing_endpoint):
    result = run_cli("run", "offline", "--workdir", str(tmp_path / "w"), *FAST,
                     "--set", f"checkpoint.uri=s3://ckpt/runs,s3.endpoint={failing_endpoint},s3.retrySeconds=2",
                     env={**ENV, **CREDENTIALS, "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode == 144, result.stdout
    assert "refusing to start fresh" in result.summary["error"]
    assert "s3.retrySeconds" in result.summary["error"]
    assert "resumed" not in result.stdout and "step 1" not in result.stdout
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


def test_a_dead_local_endpoint_is_reported_in_seconds_before_anything_starts(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("run", "offline", "--workdir", str(tmp_path / "w"), *FAST,
                     "--set", f"checkpoint.uri=s3://ckpt/runs,s3.endpoint={dead}",
                     env={**ENV, **CREDENTIALS}, timeout=45)  # a pod's patient retry would take minutes
    assert result.returncode == 144, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"s3.endpoint {dead} is unreachable (connection refused" in result.stderr
    assert "s3://ckpt/runs" in result.stderr
    assert not (tmp_path / "w").exists()  # nothing started, nothing written


def test_ctrl_c_while_the_store_is_waited_for_is_interrupted(tmp_path, failing_endpoint, monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    # retrySeconds far beyond the test's patience: only Ctrl-C can end this wait in time.
    proc = start_run(tmp_path, "--set", f"checkpoint.uri=s3://ckpt/runs,s3.endpoint={failing_endpoint}",
                     "--set", "s3.retrySeconds=3600")
    _, lines = read_until(proc, r"failed \(503 SlowDown\); retry")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the foreground process group
    result = finish(proc, lines)
    assert result.returncode == 130, result.stdout[-3000:] + result.stderr
    assert result.summary["status"] == "interrupted" and result.summary["exit_code"] == 130
    assert "stopped waiting for checkpoint store" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_store_gone_from_this_machine_is_not_restarted_for(tmp_path, monkeypatch):
    """The endpoint answered at the start, then stops taking connections: the replica exits 144 after
    s3.retrySeconds, and the runner does not restart it to wait again, as an operator would a pod."""
    for key, value in {**CREDENTIALS, "AWS_MAX_ATTEMPTS": "1"}.items():  # our retries only: one logged each
        monkeypatch.setenv(key, value)
    proxy = SlowDownProxy()
    proc = start_run(tmp_path, "--set", f"checkpoint.uri=s3://ckpt/runs,s3.endpoint={proxy.endpoint}",
                     "--set", "s3.retrySeconds=10,job.restartPolicy=ExitCode,job.backoffLimit=3")
    _, lines = read_until(proc, r"failed \(503 SlowDown\); retry")
    proxy.close()  # now nothing listens there
    result = finish(proc, lines)
    assert result.returncode == 144, result.stdout[-3000:]
    assert f"[kubetrain] no restart: s3.endpoint {proxy.endpoint} is unreachable (connection refused" in result.stdout
    assert result.summary["restarts"] == 0


def test_missing_s3_credentials_is_a_clear_user_error(tmp_path, failing_endpoint):
    env = {k: "" for k in CREDENTIALS}
    result = run_cli("run", "nocreds", "--workdir", str(tmp_path / "w"), *FAST,
                     "--set", f"checkpoint.uri=s3://ckpt/runs,s3.endpoint={failing_endpoint}", env={**ENV, **env})
    assert result.returncode == 2
    assert "AWS_ACCESS_KEY_ID" in result.summary["error"]


class UndeletableStore(FileStore):
    """A real local store that refuses to delete any file it holds, standing in for a bucket whose
    policy denies DeleteObjects."""

    def delete(self, keys: list[str]) -> None:
        if any(self.local_path(key).exists() for key in keys):
            raise RetryableError("DeleteObjects refused", 144)


def test_a_failed_retention_warns_and_the_next_save_deletes_the_old_steps(tmp_path, caplog):
    trainer = in_process_trainer(tmp_path, {"data": {"trainSamples": 64, "evalSamples": 32}})
    uri = (tmp_path / "store").as_uri()
    config = replace(trainer.config, checkpoint=replace(trainer.config.checkpoint, uri=uri, keep_last=1))
    manager = CheckpointManager(config, SINGLE, store=UndeletableStore(uri))
    for step in (1, 2):
        trainer.state.step = step
        manager.save(trainer)  # commits, although retention fails: the run goes on
    manager.wait()
    steps = tmp_path / "store" / "test"
    assert sorted(p.parent.name for p in steps.glob("step-*/commit.json")) == ["step-00000001", "step-00000002"]
    assert "retention (keepLast=1) could not delete old steps" in caplog.text
    assert "DeleteObjects refused" in caplog.text and "Traceback" not in caplog.text

    manager.store = FileStore(uri)  # the store accepts deletes again
    trainer.state.step = 3
    manager.save(trainer)
    manager.close()
    assert sorted(p.name for p in steps.iterdir()) == ["step-00000003"]
