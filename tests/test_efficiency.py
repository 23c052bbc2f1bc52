"""Efficiency figures: model FLOPs and MFU against a hand count, tokens/s without padding, peaks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from support import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKEN_TASK = ["--set", "training.task=custom,training.entrypoint=token_stack:build",
              "--set-json", f"training.pythonPath={json.dumps([str(FIXTURES)])}"]


def test_mfu_and_tokens_per_second_of_a_linear_stack_match_the_hand_count(tmp_path):
    from fixtures import token_stack  # linear layers over padded positions

    s, batch, peak = token_stack.shape({}), 8, 10**12
    result = run_cli("run", "mfu", "--workdir", str(tmp_path / "run"), *TOKEN_TASK, "--set",
                     f"job.nodes=1,training.epochs=1,training.batchSize={batch},training.logEverySteps=4,"
                     f"metrics.enabled=false,metrics.peakFlops={peak}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    # Per [B*T, in] x [in, out] layer: 2*B*T*in*out forward, the same for the weight gradient and for the
    # input gradient, except the first layer's (its input needs none): 6*B*T*sum(in*out) - 2*B*T*in0*out0.
    (d, h), t = token_stack.layers(s)[0], s["positions"]
    hand = 6 * batch * t * sum(i * o for i, o in token_stack.layers(s)) - 2 * batch * t * d * h
    logged = float(re.search(r"model FLOPs per step: (\S+) per rank", result.stdout)[1])
    assert logged == pytest.approx(hand, rel=0.02)
    # MFU = FLOPs per step x the reported step rate / peak; the step rate is samples/s over samples per step.
    summary = result.summary
    steps_per_second = summary["samples_per_second"] / batch
    assert summary["mfu"] == pytest.approx(hand * steps_per_second / peak, rel=0.02)
    assert re.search(r"step 8/8 .* mfu \d+\.\d%", result.stdout)
    # Tokens: the real positions of all 64 samples (one epoch), not the 64 x 16 padded ones.
    real = sum(1 + i % t for i in range(s["samples"]))
    assert real < s["samples"] * t
    wall = s["samples"] / summary["samples_per_second"]  # the one epoch's samples over samples/s
    assert summary["tokens_per_second"] * wall == pytest.approx(real, rel=1e-6)
    assert re.search(r"step 8/8 .* tokens/s \d+", result.stdout)
    # TensorBoard: both figures at each log step.
    from test_tensorboard_export import scalars

    curves, _ = scalars(tmp_path / "run" / "tensorboard")
    for tag in ("train/tokens_per_second", "train/mfu"):
        assert [step for step, value in curves[tag] if value > 0] == [4, 8], (tag, curves.get(tag))


def test_without_a_known_peak_mfu_is_not_reported_and_the_log_says_why():
    from trainer.worker.efficiency import Efficiency

    efficiency = Efficiency(torch.device("cpu"), "fp32")
    efficiency.flops_per_step = 1e9
    assert efficiency.peak is None and efficiency.mfu(10.0) is None
    assert efficiency.describe() == ("MFU: not reported: no peak FLOP/s is known for the cpu device; "
                                     "set metrics.peakFlops to report it")
    assert efficiency.gpu_stats() == {}  # no GPU figures off CUDA (and no NVML import)
    assert Efficiency(torch.device("cpu"), "bf16", 2e12).mfu(10.0) is None  # nothing counted yet


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
    ("NVIDIA H100 PCIe", "bf16", 756.5e12),
    ("NVIDIA H100 NVL", "fp16", 835.5e12),
    ("NVIDIA H200", "bf16", 989.4e12),
    ("NVIDIA GH200 480GB", "bf16", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362.05e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("NVIDIA A10G", "bf16", None),  # not A10's figures: unknown, so not reported
    ("Tesla T4", "fp16", None),
])
def test_peak_table_matches_device_names(name, precision, peak):
    from trainer.worker.efficiency import table_peak

    assert table_peak(name, precision) == peak


def test_causal_lm_tokens_exclude_padding():
    from trainer.tasks._llm_data import IGNORE, CausalCollate, Example

    pad = 0
    # A prompt (no labels) + answer, and a shorter one whose real last token is the pad id with a label.
    items = [(Example([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), None), (Example([5, 0], [IGNORE, 0]), None)]
    collate = CausalCollate(pad)
    batch = collate(items)
    assert batch[0]["input_ids"].numel() == 8
    assert int(collate.count_tokens(batch)) == 6


def test_bert_tokens_are_the_attention_mask(tmp_path):
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra")
    from trainer.tasks.bert_sentiment import DynamicPaddingCollate, _synthetic_tokenizer, count_tokens

    tokenizer = _synthetic_tokenizer(tmp_path)
    batch = DynamicPaddingCollate(tokenizer, 128)([("good movie", 1), ("the film was really quite dull", 0)])
    ids = batch[0]["input_ids"]
    assert ids.shape == (2, 8)  # [CLS] 6 words [SEP]; the first row padded by 4
    assert int(count_tokens(batch)) == 4 + 8


def test_efficiency_series_in_the_exposition():
    from prometheus_client import generate_latest

    from trainer.worker.metrics import MetricsProcessor

    metrics = MetricsProcessor("demo", 1, port=0)
    metrics.observe_efficiency(None, None, None, {})  # cifar on CPU: nothing to report
    text = generate_latest(metrics.registry).decode()
    assert not re.search(r"^kubetrain_(tokens_total|mfu_ratio|gpu_\w+)\{", text, re.M)
    metrics.observe_efficiency(1200, 0.41, 3e12, {"allocated": 1e9, "reserved": 2e9, "peak": 1.5e9,
                                                  "utilization": 0.97, "power_watts": 650.0})
    metrics.observe_efficiency(800, 0.40, 3e12, {})
    text = generate_latest(metrics.registry).decode()
    for line in ('kubetrain_tokens_total{experiment="demo",rank="1"} 2000.0',
                 'kubetrain_mfu_ratio{experiment="demo",rank="1"} 0.4',
                 'kubetrain_model_flops_per_step{experiment="demo",rank="1"} 3e+12',
                 'kubetrain_gpu_memory_reserved_bytes{experiment="demo",rank="1"} 2e+09',
                 'kubetrain_gpu_utilization_ratio{experiment="demo",rank="1"} 0.97',
                 'kubetrain_gpu_power_watts{experiment="demo",rank="1"} 650.0'):
        assert line in text, line
