"""How a `kubetrain run` ends, as a new user meets it: one summary line (the runner's, last, strict
JSON), a few lines naming where the model, the curves and the checkpoint went, and mistakes and a
diverged loss told in one stderr line without a traceback."""

from __future__ import annotations

import json

from support import run_cli
from trainer.summary import MARKER

FAST = [
    "--set", "job.nodes=1,job.backoffLimit=0,metrics.enabled=false",
    "--set", "training.data.trainSamples=256,training.data.evalSamples=64,training.batchSize=32",
    "--set", "training.epochs=1,training.logEverySteps=2",
]
ENV = {"OMP_NUM_THREADS": "1"}

USER_TASK = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def not_a_module(cfg):
    return {"model": "resnet", "train_dataset": TensorDataset(torch.randn(64, 4), torch.zeros(64).long())}


def labels_beyond_the_head(cfg):  # labels 0..3 for a head of numClasses outputs
    data = TensorDataset(torch.randn(64, 4), torch.arange(64) % 4)
    return {"model": nn.Linear(4, cfg.num_classes), "train_dataset": data}
'''


def strict(line: str) -> dict:
    """A summary line parsed as strict JSON: NaN and Infinity refused."""
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant} in {line}")
    return json.loads(line, parse_constant=refuse)


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stdout[-3000:]
    return lines[0]


def summaries(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if MARKER in line]


def test_custom_entrypoint_mistakes_name_the_key_and_what_was_found(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "user_task.py").write_text(USER_TASK)
    custom = f"training.task=custom,training.pythonPath[0]={tmp_path / 'src'},training.numClasses=3"

    module = run_cli("run", "mod", "--workdir", str(tmp_path / "mod"), *FAST, "--set", custom,
                     "--set", "training.entrypoint=user_task:not_a_module", env=ENV)
    assert module.returncode == 2, module.stdout[-3000:]
    assert one_error_line(module) == ("Error: training.entrypoint: user_task:not_a_module returned a model of "
                                      "type str, expected a torch.nn.Module")

    labels = run_cli("run", "labels", "--workdir", str(tmp_path / "labels"), *FAST, "--set", custom,
                     "--set", "training.entrypoint=user_task:labels_beyond_the_head", env=ENV)
    assert labels.returncode == 2, labels.stdout[-3000:]
    line = one_error_line(labels)
    assert line.startswith("Error: training.numClasses: a label is out of range for the model's 3 outputs "
                           "(Target 3 is out of bounds); training.numClasses is 3"), line
    assert labels.summary["status"] == "failed" and labels.summary["exit_code"] == 2
    assert not (tmp_path / "labels" / "model").exists()  # nothing exported


def test_an_iterable_training_set_is_refused_by_name(tmp_path):
    """The loop samples the training set by index (each rank its shard, a resume at its data position)."""
    (tmp_path / "streamed.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Stream(torch.utils.data.IterableDataset):\n"
        "    def __iter__(self):\n        return iter([(torch.randn(4), 0)] * 64)\n\n"
        "def build(cfg):\n    return {'model': nn.Linear(4, cfg.num_classes), 'train_dataset': Stream()}\n")
    result = run_cli("run", "stream", "--workdir", str(tmp_path / "w"), *FAST, "--set",
                     f"training.task=custom,training.pythonPath[0]={tmp_path},training.entrypoint=streamed:build",
                     env=ENV)
    assert result.returncode == 2, result.stdout[-3000:]
    assert one_error_line(result) == ("Error: training.entrypoint: streamed:build returned a train_dataset of type "
                                      "Stream, expected a map-style dataset (with __getitem__ and __len__), not an "
                                      "iterable one")
    assert not (tmp_path / "w" / "model").exists()


def test_a_diverged_loss_names_its_step_exits_1_and_keeps_the_step_count(tmp_path):
    result = run_cli("run", "boom", "--workdir", str(tmp_path), *FAST,
                     "--set-json", "training.optimizer.lr=1e9", env=ENV)
    assert result.returncode == 1, result.stdout[-3000:]
    line = one_error_line(result)
    assert line.startswith("Error: training diverged: the train loss became nan at step "), line
    step = int(line.split(" at step ")[1].split()[0])
    summary = strict(summaries(result)[-1])
    assert summary == result.summary and summaries(result) == [result.stdout.splitlines()[-1]]
    assert summary["status"] == "failed" and summary["exit_code"] == 1 and summary["train_loss"] is None
    assert 1 <= step <= summary["steps"] <= 8 and summary["steps"] % 2 == 0  # the log step that saw it
    assert not (tmp_path / "model").exists()


def test_a_run_says_what_it_keeps_and_ends_with_where_it_went(tmp_path):
    (tmp_path / "termination-log").touch()  # the kubelet makes it; the trainer never creates one
    result = run_cli("run", "kept", "--workdir", str(tmp_path), *FAST,
                     env={**ENV, "KUBETRAIN_TERMINATION_LOG": str(tmp_path / "termination-log")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"[kubetrain] checkpoint.uri is not set: the trained model and TensorBoard events go to "
                        f"{tmp_path}, but no checkpoint is kept, so a rerun starts from step 0; --set "
                        f"checkpoint.uri={(tmp_path / 'checkpoints').as_uri()} keeps checkpoints (and a rerun "
                        "resumes)")
    assert lines[-4:-1] == [f"[kubetrain] model:       {tmp_path / 'model'}",
                            f"[kubetrain] tensorboard: kubetrain tensorboard kept --workdir {tmp_path}",
                            "[kubetrain] checkpoint:  none (checkpoint.uri is not set)"]
    assert (tmp_path / "model" / "model.json").is_file() and list((tmp_path / "tensorboard").iterdir())
    # One summary, the runner's, last; the trainer's own reached it (its figures) and the termination log.
    assert summaries(result) == [lines[-1]]
    summary = strict(lines[-1])
    assert summary["status"] == "succeeded" and summary["steps"] == 8 and summary["restarts"] == 0
    trainer_own = strict((tmp_path / "termination-log").read_text())
    assert trainer_own["steps"] == 8 and trainer_own["train_loss"] == summary["train_loss"]
    assert "restarts" not in trainer_own and result.stderr == ""


def test_a_finished_run_rerun_names_what_exists_in_strict_json(tmp_path):
    store = (tmp_path / "store").as_uri()
    first = run_cli("run", "done", "--workdir", str(tmp_path / "w"), *FAST, "--set", f"checkpoint.uri={store}",
                    env=ENV)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    assert "checkpoint.uri is not set" not in first.stdout
    again = run_cli("run", "done", "--workdir", str(tmp_path / "w"), *FAST, "--set", f"checkpoint.uri={store}",
                    env=ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert "nothing left to train" in again.stdout
    summary = strict(again.stdout.splitlines()[-1])
    assert summary["steps"] == 8 and summary["train_loss"] is None  # nothing trained this time: unknown
    assert summary["model"] == (tmp_path / "w" / "model").as_uri() == first.summary["model"]
    assert summary["checkpoint"] == f"{store}/done/step-00000008"
    assert f"[kubetrain] checkpoint:  {tmp_path / 'store' / 'done' / 'step-00000008'} (a rerun resumes from it)" \
        in again.stdout.splitlines()


def test_a_config_change_on_resume_lists_only_what_resuming_depends_on(tmp_path):
    store = (tmp_path / "store").as_uri()
    first = run_cli("run", "cfg", "--workdir", str(tmp_path / "a"), *FAST, "--set",
                    f"checkpoint.uri={store},training.maxSteps=4", env=ENV)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    # A new workdir, metrics port, freeze list and step count do not matter to resuming; the seed does.
    changed = run_cli("run", "cfg", "--workdir", str(tmp_path / "b"), *FAST, "--set",
                      f"checkpoint.uri={store},training.seed=7,metrics.port=9555,training.finetune.freeze[0]=features",
                      env=ENV)
    assert changed.returncode == 2, changed.stdout[-3000:]
    line = one_error_line(changed)
    assert "different config" in line and "training.seed: 1234 -> 7. " in line, line
    for unchanged in ("freeze", "metrics", "port", "workdir", "maxSteps", "max_steps"):
        assert unchanged not in line, line


def test_kubetrain_status_shows_a_summary_termination_message_by_its_error():
    """In a pod the trainer's summary is also its termination message; `kubetrain status` shows its error
    (a pod that died before writing one shows its last log line, FallbackToLogsOnError)."""
    from trainer.controller.jobs import termination

    def pod(message: str) -> dict:
        ended = {"exitCode": 1, "reason": "Error", "message": message}
        return {"status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": ended}}]}}

    summary = '{"event": "summary", "status": "failed", "steps": 6, "error": "training diverged: at step 5"}\n'
    assert termination(pod(summary), "pytorch") == "  exit code 1 (Error): training diverged: at step 5"
    assert termination(pod("log line\nKilled\n"), "pytorch") == "  exit code 1 (Error): Killed"
