"""Every workload trains a few dozen steps on 2 gloo processes (`kubetrain run`) and its loss falls."""

from __future__ import annotations

import pytest

from fixtures.tasks_helpers import resnet_weights_uri, tiny_bert_dir
from support import run_cli

TWO_RANKS = {"job": {"nodes": 2, "nprocPerNode": 1}, "metrics": {"enabled": False}}
ENV = {"OMP_NUM_THREADS": "1"}


def train(tmp_path, values_file, name: str, training: dict):
    values = values_file({**TWO_RANKS, "training": {"logEverySteps": 4, **training}})
    result = run_cli("run", name, "-f", str(values), "--workdir", str(tmp_path / "run"), env=ENV)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.summary
    assert summary["status"] == "succeeded" and summary["world_size"] == 2
    return summary


def test_resnet18_finetune_from_weights_file(tmp_path, values_file):
    summary = train(tmp_path, values_file, "resnet", {
        "task": "resnet18-finetune", "pretrained": resnet_weights_uri(tmp_path), "numClasses": 4,
        "batchSize": 8, "maxSteps": 16, "optimizer": {"lr": 0.01}, "lrSchedule": {"warmupSteps": 2},
        "data": {"trainSamples": 256, "evalSamples": 32}, "options": {"imageSize": 32},
    })
    assert summary["steps"] == 16
    assert summary["train_loss"] < 0.8 * summary["first_train_loss"], summary


def test_bert_sentiment_tiny_offline_model(tmp_path, values_file):
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra: pip install 'kubetrain[nlp]'")
    summary = train(tmp_path, values_file, "bert", {
        "task": "bert-sentiment", "pretrained": tiny_bert_dir(tmp_path).as_uri(), "numClasses": 2,
        "batchSize": 16, "epochs": 3, "maxSteps": 60, "optimizer": {"lr": 0.01},
        "lrSchedule": {"warmupSteps": 4}, "data": {"trainSamples": 640, "evalSamples": 128},
    })
    assert summary["train_loss"] < 0.75 * summary["first_train_loss"], summary
    assert summary["eval_accuracy"] > 0.7, summary


def test_bert_sentiment_on_synthetic_data_trains_with_the_hub_offline(tmp_path):
    """Random weights on synthetic sentences need no download (it went to the hub for a tokenizer and a
    config, and failed offline after a minute): a run with the hub switched off trains and exports."""
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra: pip install 'kubetrain[nlp]'")
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = run_cli("run", "bert", "--workdir", str(tmp_path / "run"), "--set",
                     "job.nodes=1,training.task=bert-sentiment,training.maxSteps=2,training.batchSize=8,"
                     "training.data.trainSamples=32,training.data.evalSamples=8,metrics.enabled=false",
                     env={**ENV, **offline})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.summary["steps"] == 2 and result.summary["model"], result.summary
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert result.summary["tokens_per_second"] > 0  # a token task: the attention mask's tokens


def empty_caches(tmp_path) -> dict[str, str]:
    """Hub and weights caches that hold nothing, whatever this machine has cached."""
    return {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "KUBETRAIN_WEIGHTS_CACHE": str(tmp_path / "weights-cache")}


@pytest.mark.parametrize("sets, env, error", [
    ("training.task=bert-sentiment,training.options.model=distilbert-base-uncased", {"HF_HUB_OFFLINE": "1"},
     "training.options.model: 'distilbert-base-uncased' needs its tokenizer and config from the Hugging Face hub, "
     "but HF_HUB_OFFLINE is set"),
    ("training.task=bert-sentiment,training.pretrained=true", {"TRANSFORMERS_OFFLINE": "1"},
     "training.pretrained: 'distilbert-base-uncased' needs its weights, tokenizer and config from the Hugging Face "
     "hub, but TRANSFORMERS_OFFLINE is set"),
    ("training.task=bert-sentiment,training.data.source=file,training.data.path=reviews.csv",
     {"HF_HUB_OFFLINE": "true"}, "training.options.model: 'distilbert-base-uncased' needs its tokenizer and config"),
    ("training.task=causal-lm,training.pretrained=hf://Qwen/Qwen2.5-0.5B@main", {"HF_HUB_OFFLINE": "1"},
     "training.pretrained: 'Qwen/Qwen2.5-0.5B' needs its model folder from the Hugging Face hub"),
    # the pods' own env (values `env`) is what the replicas get
    ("training.task=bert-sentiment,training.options.model=org/model,env[0].name=HF_HUB_OFFLINE,env[0].value=ON", {},
     "training.options.model: 'org/model' needs its tokenizer and config from the Hugging Face hub"),
], ids=["options-model", "pretrained-true", "file-data", "causal-lm-hf", "values-env"])
def test_a_hub_model_is_refused_before_any_replica_starts_when_the_run_is_offline(tmp_path, sets, env, error):
    """It loaded the replicas and then failed in transformers (after about a minute of retries without a
    route out, 3 s with HF_HUB_OFFLINE=1), in a two-line message."""
    result = run_cli("run", "hub", "--workdir", str(tmp_path / "run"), "--set", sets, env={**empty_caches(tmp_path),
                                                                                           **env})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: {error}"), lines[0]
    assert "set training.pretrained to a file:// or s3:// folder written by save_pretrained" in lines[0]
    assert not (tmp_path / "run").exists() and "[master-0]" not in result.stdout  # nothing started or written


def test_the_trainer_refuses_an_offline_hub_model_before_rendezvous(tmp_path):
    """A pod's trainer, where `kubetrain run` did not look (submit): the same refusal, before the process group."""
    config = tmp_path / "config.yaml"
    config.write_text("experiment: hub\ntraining: {task: bert-sentiment, pretrained: true}\n"
                      "metrics: {enabled: false}\n")
    result = run_cli("--config", str(config), module="trainer", env={**empty_caches(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.summary["status"] == "failed" and result.summary["error"].startswith(
        "training.pretrained: 'distilbert-base-uncased' needs its weights, tokenizer and config from the "
        "Hugging Face hub, but HF_HUB_OFFLINE is set"), result.summary
    assert "rank table" not in result.stdout and "Traceback" not in result.stdout + result.stderr, result.stdout


def test_a_hub_model_in_the_local_cache_trains_offline(tmp_path):
    """The check reads huggingface_hub's cache layout as transformers does: a cached name is not refused."""
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra: pip install 'kubetrain[nlp]'")
    cache = tmp_path / "hf-cache" / "models--kubetrain-tests--tiny-bert"
    snapshot = cache / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    tiny_bert_dir(tmp_path).rename(snapshot)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0" * 40)
    result = run_cli("run", "cached", "--workdir", str(tmp_path / "run"), "--set",
                     "job.nodes=1,training.task=bert-sentiment,training.options.model=kubetrain-tests/tiny-bert,"
                     "training.pretrained=true,training.maxSteps=2,training.batchSize=8,training.data.trainSamples=32,"
                     "training.data.evalSamples=8,metrics.enabled=false",
                     env={**ENV, **empty_caches(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.summary["steps"] == 2, result.summary


def test_custom_entrypoint_from_a_package_outside_the_repo(tmp_path, values_file):
    package = tmp_path / "user_src" / "ring_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "task.py").write_text(CUSTOM_TASK)
    summary = train(tmp_path, values_file, "custom", {
        "task": "custom", "entrypoint": "ring_model.task:build", "pythonPath": [str(tmp_path / "user_src")],
        "numClasses": 3, "batchSize": 32, "epochs": 3, "optimizer": {"lr": 0.01},
        "data": {"trainSamples": 1024, "evalSamples": 256}, "options": {"hidden": 32},
    })
    assert summary["train_loss"] < 0.7 * summary["first_train_loss"], summary
    assert summary["eval_accuracy"] > 0.7, summary


def test_custom_entrypoint_that_cannot_be_imported_is_a_user_error(tmp_path):
    result = run_cli("run", "missing", "--workdir", str(tmp_path), "--set",
                     "job.nodes=1,training.task=custom,training.entrypoint=not_installed.mod:build,metrics.enabled=false",
                     env=ENV)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "training.entrypoint" in result.stdout and "not_installed.mod" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_task_on_two_ranks_exits_2_listing_every_task_before_starting(tmp_path):
    result = run_cli("run", "nope", "--workdir", str(tmp_path / "w"), "--set",
                     "job.nodes=2,training.task=nope,metrics.enabled=false", env=ENV)
    assert result.returncode == 2, result.stdout[-2000:]
    line = next(ln for ln in result.stderr.splitlines() if "training.task: 'nope' is not one of" in ln)
    for name in ("bert-sentiment", "cifar10-convnet", "custom", "resnet18-finetune", "speech-conv1d"):
        assert name in line
    assert result.stdout == "" and not (tmp_path / "w").exists(), "no replica was started"


CUSTOM_TASK = '''
import math
import torch
from torch import nn
from torch.utils.data import TensorDataset


def rings(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    radius = 1.0 + labels.float() + 0.2 * torch.randn(n, generator=g)
    return TensorDataset(torch.stack([radius * angle.cos(), radius * angle.sin()], 1) / classes, labels)


def build(cfg):
    hidden = cfg.options["hidden"]
    model = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, cfg.num_classes))
    return {"model": model, "train_dataset": rings(cfg.data.train_samples, cfg.num_classes, cfg.seed),
            "eval_dataset": rings(cfg.data.eval_samples, cfg.num_classes, cfg.seed + 1)}
'''
