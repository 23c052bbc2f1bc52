"""`kubetrain run`: the quickstart job as real gloo processes."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from support import EXAMPLES, FAST_TRAINING, Result, finish, read_until, run_cli, start_run


def test_quickstart_two_gloo_processes_learn(tmp_path):
    result = run_cli("run", "quickstart", "-f", str(EXAMPLES / "quickstart.yaml"),
                     "--workdir", str(tmp_path), "--set", "training.epochs=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    summary = result.summary
    assert summary["event"] == "summary" and summary["status"] == "succeeded"
    assert summary["world_size"] == 2
    assert summary["steps"] == 2 * 8192 // (32 * 2)
    assert summary["train_loss"] < 0.5 * summary["first_train_loss"], "loss did not fall"
    assert summary["eval_accuracy"] > 0.6, "accuracy should be far above chance (0.1)"
    for key in ("eval_loss", "samples_per_second", "wall_seconds", "checkpoint"):
        assert key in summary
    # Every replica's output is streamed with its prefix; the rank table lists both ranks.
    assert "[master-0]" in result.stdout and "rank table" in result.stdout
    assert re.search(r"^\[master-0\] 1 +0 +1 +worker-1 ", result.stdout, re.M)
    assert (tmp_path / "config.json").is_file()
    # Rank 0 says once where the time to its first step went; the phases add up to the total.
    startup = re.findall(r"^\[master-0\] .* start-up: (.*); ([\d.]+)s from process start$", result.stdout, re.M)
    assert len(startup) == 1 and "[worker-1]" not in "".join(
        line for line in result.stdout.splitlines() if "start-up:" in line), result.stdout[-3000:]
    phases = dict(re.findall(r"([a-z][a-z ]*) ([\d.]+)s", startup[0][0]))
    assert list(phases) == ["interpreter", "imports", "config and metrics", "rendezvous", "data and model",
                            "resume", "first step"], phases
    assert abs(sum(map(float, phases.values())) - float(startup[0][1])) < 0.05
    # Rank 0 says how glibc's malloc was set for the loop (trainer/worker/host_memory.py).
    assert re.findall(r"^\[(\S+)\] .* (host memory: .*)$", result.stdout, re.M) == [
        ("master-0", "host memory: glibc malloc keeps freed blocks (mmap threshold 32 MiB, trim threshold 1 GiB)")]
    # Without checkpoint.uri no checkpoint is kept, and the run says so, and what it keeps, before it starts.
    assert summary["checkpoint"] is None
    notice = f"[kubetrain] checkpoint.uri is not set: the trained model and TensorBoard events go to {tmp_path}, " \
             f"but no checkpoint is kept, so a rerun starts from step 0; " \
             f"--set checkpoint.uri={(tmp_path / 'checkpoints').as_uri()} keeps checkpoints"
    assert result.stdout.startswith(notice), result.stdout[:300]


def test_the_quickstart_as_a_trainjob_runs_under_trainer_v2_s_contract(tmp_path):
    """job.kind: TrainJob: each replica gets only the PET_* variables Trainer v2's torch plugin sets, runs
    torchrun as a TrainJob's node does, and trains the same experiment to the same loss as the PyTorchJob."""
    common = ["--set", "training.epochs=1,training.maxSteps=20,metrics.enabled=false"]
    v2 = run_cli("run", "quickstart", "-f", str(EXAMPLES / "quickstart.yaml"), "-f",
                 str(EXAMPLES / "quickstart-trainjob.yaml"), "--workdir", str(tmp_path / "v2"), *common)
    assert v2.returncode == 0, v2.stdout[-3000:] + v2.stderr
    assert "launcher=torchrun world_size=2 nnodes=2 nproc_per_node=1" in v2.stdout
    assert v2.summary["status"] == "succeeded" and v2.summary["world_size"] == 2 and v2.summary["steps"] == 20
    v1 = run_cli("run", "quickstart", "-f", str(EXAMPLES / "quickstart.yaml"), "--workdir", str(tmp_path / "v1"),
                 *common)
    assert v1.returncode == 0, v1.stdout[-3000:]
    assert v2.summary["train_loss"] == v1.summary["train_loss"]


def _step1_loss(tmp_path, nodes: int, batch: int) -> float:
    result = run_cli(
        "run", f"ws{nodes}", "--workdir", str(tmp_path / f"ws{nodes}"),
        "--set", f"job.nodes={nodes},training.batchSize={batch},training.maxSteps=1",
        "--set", "training.logEverySteps=1,training.data.trainSamples=1024,training.data.evalSamples=64",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return result.summary["first_train_loss"]


def test_world_size_one_and_two_see_the_same_first_global_batch(tmp_path):
    # DistributedSampler shards one seeded permutation, so 1x64 and 2x32 draw the
    # same 64 samples for step 1 and the mean of the two rank means is the global
    # mean; only float summation order differs.
    one = _step1_loss(tmp_path, nodes=1, batch=64)
    two = _step1_loss(tmp_path, nodes=2, batch=32)
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)


def test_one_failing_replica_stops_the_others(tmp_path):
    proc = start_run(tmp_path, "--set", "job.backoffLimit=0")
    m, lines = read_until(proc, r"^\[master-0\] 1 +0 +1 +worker-1 +\S+ +(\d+)")
    _, more = read_until(proc, r"step \d+/")
    os.kill(int(m.group(1)), signal.SIGKILL)  # the worker dies as if OOM-killed
    result = finish(proc, lines + more)
    assert result.returncode == 137, result.stdout[-2000:]
    assert result.summary["status"] == "failed"
    assert result.summary["failed_replica"] == "worker-1"
    assert result.summary["exit_code"] == 137
    assert result.summary["restarts"] == 0


def test_retryable_exit_relaunches_every_replica(tmp_path):
    # restartPolicy ExitCode + backoffLimit 1: a SIGKILLed worker (137) is retried once,
    # as the operator would, then the second kill ends the job.
    proc = start_run(tmp_path, "--set", "job.restartPolicy=ExitCode,job.backoffLimit=1")
    lines: list[str] = []
    for _ in range(2):
        m, seen = read_until(proc, r"^\[master-0\] 1 +0 +1 +worker-1 +\S+ +(\d+)")
        _, more = read_until(proc, r"step \d+/")
        lines += seen + more
        os.kill(int(m.group(1)), signal.SIGKILL)
    result = finish(proc, lines)
    assert result.returncode == 137
    assert "restart 1/1 of every replica" in result.stdout
    assert result.summary["restarts"] == 1


def test_ctrl_c_checkpoints_and_exits_130(tmp_path):
    """A person at a terminal pressed Ctrl-C: the replicas checkpoint as for SIGTERM, and the run says it
    was interrupted and exits 130 (SIGTERM from a supervisor stays 143, preempted)."""
    proc = start_run(tmp_path, "--set", f"job.restartPolicy=Never,checkpoint.uri={(tmp_path / 'ckpt').as_uri()}")
    _, lines = read_until(proc, r"step \d+/")
    proc.send_signal(signal.SIGINT)
    result = finish(proc, lines)
    assert result.returncode == 130, result.stdout[-2000:]
    assert "[kubetrain] interrupted (Ctrl-C)" in result.stdout
    assert result.summary["status"] == "interrupted" and result.summary["exit_code"] == 130
    # One summary, the runner's: master-0's own ("preempted", as for SIGTERM) reached it and is not printed.
    assert result.stdout.count('{"event": "summary"') == 1 and '"preempted"' not in result.stdout
    assert list((tmp_path / "ckpt").rglob("commit.json")), "the interrupted run left a committed checkpoint"


def test_sigterm_is_forwarded_to_every_replica(tmp_path):
    proc = start_run(tmp_path, "--set", "job.restartPolicy=Never")
    _, lines = read_until(proc, r"step \d+/")
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, lines)
    assert result.returncode == 143, result.stdout[-2000:]
    assert result.summary["status"] == "preempted"
    assert "Traceback" not in result.stderr


def test_two_nodes_with_two_processes_each_train_under_torchrun(tmp_path):
    result = run_cli("run", "twobytwo", "--workdir", str(tmp_path), *FAST_TRAINING,
                     "--set", "job.nodes=2,job.nprocPerNode=2,training.maxSteps=12,metrics.enabled=false")
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.summary["world_size"] == 4 and result.summary["steps"] == 12
    assert "launcher=torchrun world_size=4 nnodes=2 nproc_per_node=2" in result.stdout
    # Every line whole: one log header or summary per line, at its start (ranks share a replica's stdout).
    for line in result.stdout.splitlines():
        starts = [m.start() for m in re.finditer(r'\d\d:\d\d:\d\d [A-Z]+ rank=\d|\{"event": "summary"', line)]
        assert starts in ([], [0], [len("[master-0] ")], [len("[worker-1] ")]), f"glued line: {line!r}"


def test_torchrun_replicas_keep_the_workers_exit_code(tmp_path):
    # Plain torchrun turns every worker failure into 1; the operator must see 2 (permanent, bad input).
    result = run_cli("run", "nodata", "--workdir", str(tmp_path), "--set",
                     "job.nodes=1,job.nprocPerNode=2,metrics.enabled=false,training.data.source=cifar10",
                     "--set", f"training.data.root={tmp_path / 'no-cifar'}")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "training.data.root: CIFAR-10 not found" in result.stdout


def test_sigterm_under_torchrun_exits_143_so_the_operator_retries(tmp_path):
    proc = start_run(tmp_path, "--set", "job.nodes=1,job.nprocPerNode=2,job.restartPolicy=Never")
    _, lines = read_until(proc, r"step \d+/")
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, lines)
    assert result.returncode == 143, result.stdout[-2000:]
    assert result.summary["status"] == "preempted"


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("where, needle", [
    ("file", "{tmp}/file is a file, not a directory"),
    ("file/sub/run", "{tmp}/file is a file, not a directory, so {tmp}/file/sub/run cannot be made under it"),
])
def test_a_workdir_that_is_or_lies_under_a_file_is_named(tmp_path, where, needle):
    (tmp_path / "file").write_text("mine\n")
    result = run_cli("run", "x", "--workdir", str(tmp_path / where), timeout=60)
    _one_line_error(result, needle.format(tmp=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "mine\n"


@pytest.mark.parametrize("where", ["ro", "ro/new/run"])
def test_a_read_only_workdir_is_named(tmp_path, where):
    """Read-only for root too: a read-only bind mount in a mount namespace of the command's own."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    command = [sys.executable, "-m", "trainer.controller.cli", "run", "x", "--workdir", str(tmp_path / where)]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("unshare is not on PATH (needed to make a folder read-only for root)")
        mount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", mount, str(readonly), *command]
    else:
        readonly.chmod(0o555)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    readonly.chmod(0o755)
    if "mount" in proc.stderr and "Error:" not in proc.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()}")
    made_in = "" if where == "ro" else f" (it would be made in {readonly})"
    _one_line_error(Result(proc.returncode, proc.stdout, proc.stderr),
                    f"workdir {tmp_path / where}: cannot write there{made_in}: ")
    assert not list(readonly.iterdir()), "nothing written"


def test_a_second_run_in_the_same_workdir_is_refused_naming_the_first(tmp_path):
    proc = start_run(tmp_path, "--set", "job.nodes=1,job.restartPolicy=Never")
    try:
        _, lines = read_until(proc, r"^\[master-0\] ")  # the runner holds the workdir, and so does its replica
        config = (tmp_path / "config.json").read_bytes()
        second = run_cli("run", "longrun", "--workdir", str(tmp_path), "--set", "training.epochs=1", timeout=60)
        _one_line_error(second, f"workdir {tmp_path} is in use by another kubetrain run (pid {proc.pid}, "
                                "experiment 'longrun')")
        assert (tmp_path / "config.json").read_bytes() == config, "the refused run rewrote the config"
        # The lock goes with the processes, never stale: SIGKILL the runner, and once its replica has
        # stopped too (it gets SIGTERM as its parent dies), the workdir is free.
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 90
        with open(tmp_path / "run.lock") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the workdir stayed locked after its run died"
                    time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
