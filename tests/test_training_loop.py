"""The loop's knobs as a user sees them: accumulation, precision, schedule, maxSteps."""

from __future__ import annotations

import math

import pytest

from support import run_cli
from trainer.config import trainer_config_from_values
from trainer.values import resolve_values
from trainer.worker.loop import lr_lambda

SMALL = ["--set", "training.data.trainSamples=512,training.data.evalSamples=128,training.logEverySteps=1"]


def _run(tmp_path, name: str, *sets: str, json_sets: tuple[str, ...] = ()):
    args = [a for s in sets for a in ("--set", s)] + [a for s in json_sets for a in ("--set-json", s)]
    result = run_cli("run", name, "--workdir", str(tmp_path / name), *SMALL, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return result.summary


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # 2 ranks x 2 micro-batches of 8 == 2 ranks x 1 batch of 16: the same 32 samples, the same
    # mean gradient (no_sync skips only the intermediate all-reduce). Step 1's loss is taken before
    # any update, so what shows accumulation is the loss after updates: plain SGD (whose step scales
    # with the gradient, unlike Adam's), no clipping and no warmup, so a wrong gradient moves it.
    plain = "training.optimizer.name=sgd,training.gradClipNorm=0,training.lrSchedule.warmupSteps=0,training.maxSteps=3"
    lr = ("training.optimizer.lr=0.01",)
    accum = _run(tmp_path, "accum", "training.batchSize=8,training.gradAccumSteps=2", plain, json_sets=lr)
    big = _run(tmp_path, "big", "training.batchSize=16,training.gradAccumSteps=1", plain, json_sets=lr)
    assert accum["steps"] == big["steps"] == 3
    assert accum["first_train_loss"] == pytest.approx(big["first_train_loss"], rel=1e-5)
    assert abs(big["train_loss"] - big["first_train_loss"]) > 1e-3  # the updates moved the loss
    assert accum["train_loss"] == pytest.approx(big["train_loss"], rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains(tmp_path, precision):
    summary = _run(tmp_path, precision, f"job.nodes=1,training.precision={precision}",
                   "training.maxSteps=30,training.batchSize=32,training.logEverySteps=10")
    assert summary["status"] == "succeeded" and summary["steps"] == 30
    assert math.isfinite(summary["train_loss"])
    assert summary["train_loss"] < summary["first_train_loss"]


def test_max_steps_stops_mid_epoch_and_still_evaluates(tmp_path):
    summary = _run(tmp_path, "maxsteps", "job.nodes=1,training.maxSteps=5,training.epochs=10")
    assert summary["steps"] == 5 and summary["epochs"] == 1
    assert summary["eval_accuracy"] is not None


def test_warmup_then_cosine_to_the_floor():
    values = resolve_values(set_values=["training.lrSchedule.warmupSteps=10",
                                        "training.lrSchedule.minLrRatio=0"])
    cfg = trainer_config_from_values("sched", values).training
    factor = lr_lambda(cfg, total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5, abs=1e-6)  # half-way down the cosine
    assert factor(110) == pytest.approx(0.0, abs=1e-9)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 110))
