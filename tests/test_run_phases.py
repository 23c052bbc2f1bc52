"""No silent minutes (#33 items 16-18): lazy synthetic data, phase lines, one config line, quick model loading."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from support import REPO, run_cli

ENV = {"OMP_NUM_THREADS": "1"}
TINY_SPEECH = ("training.task=speech-conv1d,training.numClasses=4,training.maxSteps=2,training.batchSize=8,"
               "training.data.trainSamples=64,training.data.evalSamples=16,training.options.sampleRate=4000,"
               "training.options.seconds=0.25,training.options.channels=8,training.options.blocks=2,"
               "metrics.enabled=false")


def rank_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("[")]


# ------------------------------------------------------------------ lazy synthetic data (item 16)
def test_a_synthetic_item_is_the_same_in_any_order_and_in_a_dataloader_worker():
    from trainer.tasks._synthetic import LazyDataset, synthetic_classification
    from trainer.tasks.speech_conv1d import LogMel, SyntheticAudio

    for make in (lambda: synthetic_classification(50, 4, (3, 8, 8), seed=3),
                 lambda: LazyDataset(50, SyntheticAudio(4, 4000, 0.25, 3, LogMel(4000, 16)))):
        forward, backward = make(), make()
        assert not forward.cache, "nothing is made before it is asked for"
        late = [backward[i] for i in reversed(range(50))][::-1]
        early = [forward[i] for i in range(50)]
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(early, late))
        worker = torch.utils.data.DataLoader(make(), batch_size=10, num_workers=1)
        inputs, labels = next(iter(worker))
        assert torch.equal(inputs, torch.stack([x for x, _ in early[:10]]))
        assert labels.tolist() == [y for _, y in early[:10]]
        assert len({y for _, y in early}) > 1 and not torch.equal(early[0][0], early[1][0])
    train, held_out = (synthetic_classification(400, 4, (3, 8, 8), 3, split_offset=s) for s in (0, 1))
    assert not torch.equal(train[0][0], held_out[0][0]), "the eval split draws other items"
    inputs = torch.stack([train[i][0] for i in range(400)])
    assert abs(float(inputs.std()) - 1.0) < 0.1, "unit variance, like normalised real data"


# ------------------------------------------------------------------ one config line, rank 0 (item 17)
def test_only_rank_0_prints_the_config_as_one_line_and_the_whole_config_goes_to_a_file(tmp_path):
    result = run_cli("run", "cfgline", "--workdir", str(tmp_path), "--set", "job.nodes=2," + TINY_SPEECH, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    lines = rank_lines(result.stdout)
    config_lines = [ln for ln in lines if "settings changed from the defaults" in ln]
    assert len(config_lines) == 1 and config_lines[0].startswith("[master-0]") and "rank=0" in config_lines[0]
    assert "training.task=speech-conv1d" in config_lines[0] and "training.maxSteps=2" in config_lines[0]
    assert "training.lr" not in config_lines[0] and "optimizer" not in config_lines[0], "defaults stay out"
    assert (tmp_path / "config.yaml").as_uri() in config_lines[0]
    assert not any(ln.startswith("[worker-1]") and "config" in ln for ln in lines)
    assert not any("resolved config" in ln or ln.split("] ", 1)[-1].startswith(("training:", "  ")) for ln in lines
                   if "rank table" not in ln and "rank local" not in ln), "no YAML dump in the log"
    whole = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert whole["training"]["max_steps"] == 2 and whole["training"]["optimizer"]["lr"] > 0  # defaults too
    assert whole["experiment"] == "cfgline"


# ------------------------------------------------------------------ a quiet phase is logged (item 16)
SLOW_TASK = '''
import time
import torch
from torch.utils.data import TensorDataset

def build(cfg):
    time.sleep(6)  # a slow model or data build: the user must not wait in silence
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(64, 4, generator=g)
    return {"model": torch.nn.Linear(4, 2), "train_dataset": TensorDataset(x, (x[:, 0] > 0).long()),
            "eval_dataset": TensorDataset(x[:16], (x[:16, 0] > 0).long())}
'''


def test_a_phase_longer_than_a_few_seconds_logs_a_progress_line(tmp_path, values_file):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "slow_task.py").write_text(SLOW_TASK)
    values = values_file({"job": {"nodes": 1}, "metrics": {"enabled": False}, "training": {
        "task": "custom", "entrypoint": "slow_task:build", "pythonPath": [str(tmp_path / "src")], "numClasses": 2,
        "maxSteps": 2, "batchSize": 16}})
    result = run_cli("run", "slow", "-f", str(values), "--workdir", str(tmp_path / "run"), env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    lines = rank_lines(result.stdout)
    first_step = next(i for i, ln in enumerate(lines) if "start-up:" in ln)
    progress = [ln for ln in lines[:first_step] if "trainer.progress: building the custom task" in ln]
    assert progress, "\n".join(lines)
    assert "rank=0" in progress[0] and progress[0].rstrip().endswith("s)")


# ------------------------------------------------------------------ loading a model (item 18)
def test_load_exported_builds_the_network_without_the_datasets(tmp_path, monkeypatch):
    result = run_cli("run", "speech", "--workdir", str(tmp_path), "--set", "job.nodes=1," + TINY_SPEECH, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    from trainer.export import load_exported
    from trainer.tasks import speech_conv1d

    build_datasets = speech_conv1d.datasets

    def refuse(*args, **kwargs):
        raise AssertionError("load_exported built the datasets")

    monkeypatch.setattr(speech_conv1d, "datasets", refuse)
    exported = load_exported(tmp_path / "model")
    assert exported.model(torch.randn(2, 40, 26)).shape == (2, 4)
    assert not exported.model.training
    monkeypatch.setattr(speech_conv1d, "datasets", build_datasets)
    assert len(exported.spec.eval_dataset) == 16 and exported.spec.model is exported.model  # on first use


def test_bert_trained_from_a_local_folder_loads_offline(tmp_path):
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra: pip install 'kubetrain[nlp]'")
    from trainer.tasks.bert_sentiment import save_tiny_model

    folder = save_tiny_model(str(tmp_path / "tiny-bert"))  # a str, as a user writes it
    assert (folder / "config.json").is_file()
    result = run_cli("run", "bert", "--workdir", str(tmp_path / "run"), "--set",
                     f"job.nodes=1,training.task=bert-sentiment,training.pretrained={folder.as_uri()},"
                     "training.numClasses=2,training.maxSteps=2,training.batchSize=8,training.data.trainSamples=32,"
                     "training.data.evalSamples=8,metrics.enabled=false", env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    code = ("from trainer.export import load_exported; e = load_exported(%r); "
            "print(type(e.model).__name__, e.model.config.num_labels, len(e.spec.eval_dataset))"
            % str(tmp_path / "run" / "model"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV, **offline})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["BertForSequenceClassification", "2", "8"]


def test_a_phase_that_stays_quiet_is_logged_further_and_further_apart(caplog):
    """Lines at 3, 9, 21 s of quiet, not every 3 s (a long LLM step would flood the log); a new phase
    starts again at 3 s. Driven by the watcher's clock argument, not by sleeping."""
    from trainer.worker.phases import MAX_QUIET_SECONDS, QUIET_SECONDS, Phases

    phases = Phases()
    phases.enter("training", total=10, unit="steps")
    start = phases.last_line
    with caplog.at_level("INFO", logger="trainer.progress"):
        logged = [t for t in range(1, 40) if phases.tick(start + t)]
    assert logged == [3, 9, 21], logged
    assert all("training: 0/10 steps" in r.getMessage() for r in caplog.records)
    phases.enter("evaluation at step 10")
    assert not phases.tick(phases.last_line + QUIET_SECONDS - 0.5) and phases.tick(phases.last_line + QUIET_SECONDS)
    for _ in range(10):
        phases.tick(phases.last_line + MAX_QUIET_SECONDS)
    assert phases.quiet == MAX_QUIET_SECONDS
