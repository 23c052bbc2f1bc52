"""FSDP checkpoints are sharded through torch.distributed.checkpoint: 2 gloo ranks via `kubetrain run`,
against a file:// directory and a real S3 server process."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import REPO, run_cli

BUCKET = "fsdp"
STEPS, EVERY = 8, 4
VALUES = [
    "--set", "job.nodes=2,job.nprocPerNode=1,job.restartPolicy=ExitCode,job.backoffLimit=1,metrics.enabled=false",
    "--set", "training.task=speech-conv1d,training.parallelism=fsdp,training.numClasses=4,training.batchSize=16",
    "--set", "training.data.trainSamples=256,training.data.evalSamples=32",
    "--set-json", 'training.optimizer.lr=0.004', "--set-json", 'training.options.seconds=0.5',
    "--set", "training.options.sampleRate=8000,training.options.channels=16",
    "--set", f"training.options.blocks=2,training.epochs=2,training.maxSteps={STEPS},training.logEverySteps=4",
    "--set", f"training.stepLogFile=steps.jsonl,checkpoint.everySteps={EVERY},checkpoint.keepLast=2",
]
# What one committed FSDP step holds: both ranks' shards and rank 0's DCP index, no gathered model.pt.
SHARDED_STEP = {"commit.json", "train.pt", "rank-00000.pt", "rank-00001.pt",
                "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket(BUCKET)
    return s3_server


def step_losses(workdir: Path) -> dict[int, float]:
    """The step log; after a resume the re-run steps overwrite the earlier lines."""
    lines = (workdir / "steps.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def train(workdir: Path, uri: str, *args: str, env: dict | None = None):
    return run_cli("run", "sharded", "--workdir", str(workdir), *VALUES, "--set", f"checkpoint.uri={uri}", *args,
                   env={"OMP_NUM_THREADS": "1", **(env or {})})


def test_fsdp_saves_shards_from_every_rank_and_resumes_from_them_exactly_in_files(tmp_path):
    fsdp_roundtrip("file", tmp_path)


def test_fsdp_saves_shards_from_every_rank_and_resumes_from_them_exactly_in_s3(tmp_path, s3):
    fsdp_roundtrip("s3", tmp_path, s3)


def fsdp_roundtrip(scheme, tmp_path, s3=None):
    if scheme == "s3":
        # Async saves too: the snapshot of the shards uploads while training goes on.
        uri, env = f"s3://{BUCKET}/runs", s3.env
        extra = ["--set", f"s3.endpoint={s3.endpoint},checkpoint.asyncSave=true"]

        def files(step: int) -> dict[str, int]:
            prefix = f"runs/sharded/step-{step:08d}/"
            return {k[len(prefix):]: size for k, size in s3.keys(BUCKET, prefix).items()}

        def read_commit(step: int) -> dict:
            key = f"runs/sharded/step-{step:08d}/commit.json"
            return json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    else:
        uri, env, extra = (tmp_path / "store").as_uri(), {}, []

        def files(step: int) -> dict[str, int]:
            root = tmp_path / "store" / "sharded" / f"step-{step:08d}"
            return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}

        def read_commit(step: int) -> dict:
            return json.loads((tmp_path / "store" / "sharded" / f"step-{step:08d}" / "commit.json").read_text())

    first = train(tmp_path / "first", uri, *extra, env=env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    for step in (EVERY, STEPS):
        held = files(step)
        assert set(held) == SHARDED_STEP, held
        commit = read_commit(step)
        assert commit["format"] == "dcp"
        assert commit["files"] == {name: size for name, size in held.items() if name != "commit.json"}

    # Resume from the first commit: the steps after it repeat bit for bit (same floats).
    again = train(tmp_path / "again", uri, *extra, "--set", f"checkpoint.resume={EVERY}", env=env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert re.search(rf"resumed from \S+/sharded/step-{EVERY:08d}", again.stdout), again.stdout
    reference, resumed = step_losses(tmp_path / "first"), step_losses(tmp_path / "again")
    assert sorted(resumed) == list(range(EVERY + 1, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}


def test_fsdp_sigterm_on_one_rank_then_auto_resume_is_exact(tmp_path):
    uri, steps = (tmp_path / "store").as_uri(), ["--set", "training.maxSteps=16"]
    ref = train(tmp_path / "ref", (tmp_path / "ref-store").as_uri(), *steps)
    assert ref.returncode == 0, ref.stdout[-4000:] + ref.stderr[-2000:]
    reference = step_losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 17))

    workdir, lines = tmp_path / "pre", []
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", "run", "sharded", "--workdir", str(workdir), *VALUES,
         "--set", f"checkpoint.uri={uri}", *steps], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, worker = time.monotonic() + 60, None
    while worker is None and time.monotonic() < deadline:  # the trainer's pid from rank 0's rank table
        worker = next((int(m.group(1)) for line in list(lines)
                       if (m := re.search(r"\sworker-1\s+\S+\s+(\d+)\s+cpu", line))), None)
        time.sleep(0.05)
    assert worker, "".join(lines)
    log = workdir / "steps.jsonl"
    while not log.exists() or len(log.read_text().splitlines()) < 6:  # past the step-4 commit
        assert proc.poll() is None, "".join(lines)
        time.sleep(0.02)
    os.kill(worker, signal.SIGTERM)  # one rank is told; both stop at one step, save shards, exit 143
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)
    out = "".join(lines)
    assert "exited 143 (retryable): restart 1/1" in out, out
    resumed = [int(m) for m in re.findall(r"resumed from \S+/step-(\d+)", out)]
    assert len(resumed) == 1 and 6 <= resumed[0] < 16, out
    losses = step_losses(workdir)
    after = {s: losses[s] for s in range(resumed[0] + 1, 17)}
    assert after == {s: reference[s] for s in after}  # bit-exact


class RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_dcp_index_crafted_to_run_code_is_refused(tmp_path):
    uri = (tmp_path / "store").as_uri()
    first = train(tmp_path / "w", uri, "--set", f"training.maxSteps={EVERY}")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    step = tmp_path / "store" / "sharded" / f"step-{EVERY:08d}"
    marker = tmp_path / "pwned"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(str(marker))))
    commit = json.loads((step / "commit.json").read_text())  # a consistent, committed step
    commit["files"]["dcp/.metadata"] = (step / "dcp" / ".metadata").stat().st_size
    commit["sha256"]["dcp/.metadata"] = hashlib.sha256((step / "dcp" / ".metadata").read_bytes()).hexdigest()
    (step / "commit.json").write_text(json.dumps(commit))

    again = train(tmp_path / "w", uri, "--set", f"checkpoint.resume={EVERY}")
    assert again.returncode == 2, again.stdout[-4000:] + again.stderr[-2000:]
    assert "refusing to load" in again.stdout and f"step-{EVERY:08d}/dcp/.metadata" in again.stdout
    assert "posix.system is not allowed" in again.stdout
    assert "Traceback" not in again.stdout + again.stderr
    assert not marker.exists()  # nothing ran


def test_a_dcp_index_naming_a_path_outside_its_directory_is_refused(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    from trainer.errors import UserError
    from trainer.worker.sharded_checkpoint import read_metadata_safely

    index = tmp_path / ".metadata"
    storage = {MetadataIndex("model.w"): _StorageInfo(relative_path="../../outside", offset=0, length=4)}
    index.write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_data=storage)))
    with pytest.raises(UserError, match="names a shard file '../../outside'"):
        read_metadata_safely(index, "step-00000004/dcp/.metadata")


def test_a_ddp_checkpoint_resumes_under_fsdp_when_forced(tmp_path):
    # DDP keys optimizer state by parameter index, FSDP's loader by name: the manager maps one to the other.
    uri = (tmp_path / "ckpt").as_uri()
    ddp = train(tmp_path / "ddp", uri, "--set", f"training.parallelism=ddp,training.maxSteps={EVERY}")
    assert ddp.returncode == 0, ddp.stdout[-2000:]
    refused = train(tmp_path / "fsdp", uri)
    assert refused.returncode == 2 and "checkpoint.force" in refused.stdout
    forced = train(tmp_path / "fsdp", uri, "--set", "checkpoint.force=true")
    assert forced.returncode == 0, forced.stdout[-3000:]
    assert forced.summary["steps"] == STEPS
    assert min(step_losses(tmp_path / "fsdp")) == EVERY + 1  # resumed after the DDP step, not from scratch
