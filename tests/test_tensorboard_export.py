"""TensorBoard events and the exported model, read back with the real `tensorboard` package and
safetensors: locally from `kubetrain run`'s workdir, and from a real S3 server for a run started
the way the operator starts pods (no workdir, checkpoint.uri on S3)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from support import FAST_TRAINING, REPO, read_until, run_cli
from trainer.config import S3Config, trainer_config_document
from trainer.controller.local import free_port, operator_env
from trainer.controller.checks import trainer_command
from trainer.export import load_exported
from trainer.values import resolve_values

BUCKET = "boards"
TWO_EPOCHS = [*FAST_TRAINING, "--set", "training.epochs=2,metrics.enabled=false"]
LOG_STEPS = list(range(8, 65, 8))  # 2048 samples / (32 x 2 ranks) = 32 steps an epoch, a log line every 8


def scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], EventAccumulator]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def reloaded_accuracy(where, s3=None) -> float:
    """What docs/tasks.md shows: load the export, run the eval set through it."""
    exported = load_exported(where, s3)
    loader = torch.utils.data.DataLoader(exported.spec.eval_dataset, batch_size=256,
                                         collate_fn=exported.spec.collate_fn)
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            correct += (exported.model(inputs).argmax(dim=-1) == targets).sum().item()
            total += len(targets)
    return correct / total


def assert_the_curves_a_user_plots(curves: dict, events: EventAccumulator) -> None:
    loss = curves["train/loss"]
    assert [step for step, _ in loss] == LOG_STEPS, loss  # one point per logged step, no duplicates
    assert loss[-1][1] < 0.7 * loss[0][1], loss  # falling
    assert [step for step, _ in curves["eval/accuracy"]] == [32, 64], curves["eval/accuracy"]  # one per epoch
    assert [step for step, _ in curves["eval/loss"]] == [32, 64]
    for tag in ("train/learning_rate", "train/grad_norm", "train/samples_per_second",
                "step_time_seconds/rank_0", "step_time_seconds/rank_1"):
        assert [step for step, _ in curves[tag]] == LOG_STEPS, tag
        assert all(value > 0 for _, value in curves[tag]), (tag, curves[tag])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "task: cifar10-convnet" in config and "tensorboard:" in config, config


@pytest.mark.slow
def test_a_local_run_leaves_curves_and_a_model_that_reloads_to_its_eval_accuracy(tmp_path):
    result = run_cli("run", "boards", "--workdir", str(tmp_path), *TWO_EPOCHS, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    summary = result.summary
    assert summary["tensorboard"] == (tmp_path / "tensorboard").as_uri()
    assert summary["model"] == (tmp_path / "model").as_uri()
    files = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].endswith(".rank0"), files  # rank 0 writes, nobody else
    curves, events = scalars(tmp_path / "tensorboard")
    assert_the_curves_a_user_plots(curves, events)
    assert curves["eval/accuracy"][-1][1] == pytest.approx(summary["eval_accuracy"])
    print("train/loss:", [(s, round(v, 4)) for s, v in curves["train/loss"]])
    print("eval/accuracy:", [(s, round(v, 4)) for s, v in curves["eval/accuracy"]])

    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    assert metadata["task"] == "cifar10-convnet" and metadata["step"] == 64
    accuracy = reloaded_accuracy(tmp_path / "model")
    print(f"reloaded export accuracy {accuracy} vs the run's eval_accuracy {summary['eval_accuracy']}")
    assert accuracy == pytest.approx(summary["eval_accuracy"], abs=1e-12)


def test_tensorboard_and_export_off_write_neither(tmp_path):
    result = run_cli("run", "quiet", "--workdir", str(tmp_path), *FAST_TRAINING, "--set", "job.nodes=1",
                     "--set", "training.maxSteps=8,metrics.enabled=false",
                     "--set", "training.tensorboard.enabled=false,training.exportModel=false", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert result.summary["model"] is None and result.summary["tensorboard"] is None
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "model").exists()


def test_tensorboard_for_an_experiment_with_no_events_says_where_it_looked(tmp_path):
    result = run_cli("tensorboard", "nothing", "--workdir", str(tmp_path / "missing"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no TensorBoard events for 'nothing'" in result.stderr and "checkpoint.uri is empty" in result.stderr


def test_tensorboard_on_a_busy_port_names_the_port_and_prints_no_url(tmp_path):
    (tmp_path / "tensorboard").mkdir()  # a local run's events folder
    with socket.socket() as other:  # another program already serves on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = run_cli("tensorboard", "busy", "--workdir", str(tmp_path), "--port", str(port), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: port {port} on 127.0.0.1 is in use by another program: pass --port with a free port "
        "(--port 0 picks one)"]
    assert "http://" not in result.stdout, "a URL that points at the other program"
    assert [p.name for p in tmp_path.iterdir()] == ["tensorboard"]
    assert not any((tmp_path / "tensorboard").iterdir()), "nothing written"


def test_tensorboard_that_loses_the_port_after_all_is_an_error_not_a_silent_exit(tmp_path, monkeypatch):
    """The race the check above cannot close (the port taken between it and TensorBoard's bind): the
    probe finds the other program, but TensorBoard's own failure is then reported, not exit 255 alone."""
    from trainer.controller import tensorboard
    from trainer.errors import UserError

    (tmp_path / "tensorboard").mkdir()
    monkeypatch.setattr(tensorboard, "_check_port_free", lambda host, port: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGINT/SIGTERM handling
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(UserError, match=rf"tensorboard exited \(\d+\) after it started serving on "
                                            rf"127.0.0.1:{port}: .*{port}"):
            tensorboard.serve("busy", {}, tmp_path, tmp_path / "cache", "127.0.0.1", port)


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket(BUCKET)
    return s3_server


def run_as_pods(s3, tmp_path: Path, experiment: str) -> dict:
    """Two trainer processes with the operator's env and a config without a workdir, as in pods."""
    values = resolve_values(set_values=[a for a in TWO_EPOCHS if a != "--set"] + [
        f"checkpoint.uri=s3://{BUCKET}/runs,s3.endpoint={s3.endpoint},training.tensorboard.syncSeconds=1"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(trainer_config_document(experiment, values)))
    port = free_port()
    procs = [subprocess.Popen(trainer_command(values, str(config), python=sys.executable), cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, **s3.env, **operator_env(i, 2, 1, port), "OMP_NUM_THREADS": "1"})
             for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    return json.loads(outputs[0].strip().splitlines()[-1])


@pytest.mark.slow
def test_a_two_rank_run_in_pods_keeps_events_and_model_on_s3_and_kubetrain_tensorboard_serves_them(
        s3, tmp_path, monkeypatch):
    summary = run_as_pods(s3, tmp_path, "pods")
    base = f"s3://{BUCKET}/runs/pods"
    assert summary["tensorboard"] == f"{base}/tensorboard" and summary["model"] == f"{base}/model"
    events = [k for k in s3.keys(BUCKET, "runs/pods/tensorboard/")]
    assert events and all(k.endswith(".rank0") for k in events), events  # from rank 0 only
    assert not list(tmp_path.glob("**/events.out.tfevents*")), "events left only in the pod's filesystem"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env["AWS_SECRET_ACCESS_KEY"])
    accuracy = reloaded_accuracy(f"{base}/model", S3Config(s3.endpoint, "us-east-1", "path", ""))
    assert accuracy == pytest.approx(summary["eval_accuracy"], abs=1e-12)

    # `kubetrain tensorboard` mirrors the bucket's events and serves them; Ctrl-C stops it cleanly.
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", "tensorboard", "pods", "--port", "0",
         "--workdir", str(tmp_path / "no-local-run"),
         "--set", f"checkpoint.uri=s3://{BUCKET}/runs,s3.endpoint={s3.endpoint}"],
        cwd=tmp_path, env={**os.environ, **s3.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match, _ = read_until(proc, r"at (http://127\.0\.0\.1:\d+/) \(events from (\S+)\)", timeout=120)
        url, source = match.groups()
        assert source == f"{base}/tensorboard"
        tags = json.load(urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=30))
        assert {"train/loss", "eval/accuracy", "step_time_seconds/rank_1"} <= set(tags["."]), tags
        query = urllib.parse.urlencode({"run": ".", "tag": "train/loss"})
        points = json.load(urllib.request.urlopen(f"{url}data/plugin/scalars/scalars?{query}", timeout=30))
        assert [p[1] for p in points] == LOG_STEPS, points  # [wall_time, step, value] rows
        curves, accumulator = scalars(tmp_path / ".kubetrain" / "tensorboard" / "pods")
        assert_the_curves_a_user_plots(curves, accumulator)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_relative_python_path_resolves_against_the_values_file_and_says_why_when_it_cannot(tmp_path, values_file):
    missing = values_file({"training": {"task": "custom", "entrypoint": "pkg.mod:build", "pythonPath": ["src"]}})
    result = run_cli("run", "rel", "-f", str(missing), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"training.pythonPath: 'src' is relative to values file {missing}, and {tmp_path / 'src'} " \
           "is not a directory" in result.stderr, result.stderr
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_the_custom_example_runs_from_any_directory(tmp_path):
    """examples/custom_model/values.yaml says pythonPath: ["."]: its own folder, wherever the user is."""
    result = run_cli("run", "rings", "-f", str(REPO / "examples" / "custom_model" / "values.yaml"),
                     "--workdir", str(tmp_path / "w"), "--set", "job.nprocPerNode=1,training.maxSteps=10",
                     "--set", "metrics.enabled=false", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert result.summary["steps"] == 10
