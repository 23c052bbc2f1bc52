"""FSDP2 on CPU (gloo, 2 ranks) against DDP from the same seed: the same training, sharded.

The speech model has a ModuleList of residual blocks, so FSDP shards block by
block plus the root; gradient accumulation exercises the skipped reduce-scatter,
and an eval set that splits unevenly (65 samples: 3 batches on rank 0, 2 on
rank 1) exercises the filler forwards that keep FSDP's collectives in step.
"""

from __future__ import annotations

import pytest
import torch

from fixtures.tasks_helpers import logged_losses
from support import run_cli

# Sharded and replicated runs differ only in reduction order (float rounding),
# and the log prints 4 decimals: the curves must agree to 2e-3 at every logged step.
LOSS_TOLERANCE = 2e-3


def run_speech(tmp_path, values_file, parallelism: str):
    values = values_file({
        "job": {"nodes": 2, "nprocPerNode": 1}, "metrics": {"enabled": False},
        "training": {
            "task": "speech-conv1d", "parallelism": parallelism, "numClasses": 4, "batchSize": 16,
            "gradAccumSteps": 2, "epochs": 2, "maxSteps": 24, "logEverySteps": 2,
            "optimizer": {"lr": 0.004}, "lrSchedule": {"warmupSteps": 4},
            "data": {"trainSamples": 768, "evalSamples": 65},
            "options": {"sampleRate": 8000, "seconds": 0.5, "channels": 32, "blocks": 4},
        },
    }, name=f"{parallelism}.yaml")
    result = run_cli("run", f"speech-{parallelism}", "-f", str(values), "--workdir",
                     str(tmp_path / parallelism), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_fsdp_matches_ddp_and_speech_conv1d_learns(tmp_path, values_file):
    ddp, fsdp = run_speech(tmp_path, values_file, "ddp"), run_speech(tmp_path, values_file, "fsdp")
    assert "fsdp: sharded 4 blocks + root over 2 ranks" in fsdp.stdout
    ddp_losses, fsdp_losses = logged_losses(ddp.stdout), logged_losses(fsdp.stdout)
    assert sorted(ddp_losses) == sorted(fsdp_losses) == list(range(2, 25, 2))
    for step, loss in ddp_losses.items():
        assert abs(loss - fsdp_losses[step]) <= LOSS_TOLERANCE, (step, loss, fsdp_losses[step])

    summary, fsdp_summary = ddp.summary, fsdp.summary
    assert summary["train_loss"] < 0.8 * summary["first_train_loss"], summary  # speech-conv1d learns
    assert abs(summary["eval_loss"] - fsdp_summary["eval_loss"]) <= LOSS_TOLERANCE
    assert summary["eval_accuracy"] == fsdp_summary["eval_accuracy"]

    # The FSDP export is the whole model, gathered once: the DDP export's names and shapes, close in
    # value, and reloaded it scores the run's own eval accuracy.
    from safetensors.torch import load_file

    from trainer.export import load_exported

    full, gathered = (load_file(str(tmp_path / p / "model" / "model.safetensors")) for p in ("ddp", "fsdp"))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in gathered.items()}
    assert max((full[k] - gathered[k]).abs().max().item() for k in full) < 1e-2
    exported = load_exported(tmp_path / "fsdp" / "model")
    loader = torch.utils.data.DataLoader(exported.spec.eval_dataset, batch_size=64,
                                         collate_fn=exported.spec.collate_fn)
    with torch.no_grad():
        correct = sum((exported.model(x).argmax(dim=-1) == y).sum().item() for x, y in loader)
    assert correct / len(exported.spec.eval_dataset) == fsdp_summary["eval_accuracy"]


@pytest.mark.slow
def test_fsdp_matches_ddp_when_a_frozen_backbone_unfreezes_mid_run(tmp_path, values_file):
    """conv1/bn1 share FSDP's root unit with the trainable head; they unfreeze at epoch 2
    (step 7), right after an eval forward left the root unsharded."""
    losses = {}
    for parallelism in ("ddp", "fsdp"):
        values = values_file({
            "job": {"nodes": 2, "nprocPerNode": 1}, "metrics": {"enabled": False},
            "training": {
                "task": "resnet18-finetune", "parallelism": parallelism, "numClasses": 4, "batchSize": 8,
                "epochs": 2, "maxSteps": 10, "logEverySteps": 1, "gradClipNorm": 0,
                "optimizer": {"name": "sgd", "lr": 0.01},
                "finetune": {"freeze": ["conv1.", "bn1."], "unfreezeAfterEpochs": 1},
                "data": {"trainSamples": 96, "evalSamples": 17}, "options": {"imageSize": 32},
            },
        }, name=f"resnet-{parallelism}.yaml")
        result = run_cli("run", f"unfreeze-{parallelism}", "-f", str(values), "--workdir",
                         str(tmp_path / parallelism), env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert "epoch 2: unfroze the parameters under ['conv1.', 'bn1.']" in result.stdout
        losses[parallelism] = logged_losses(result.stdout)
    assert sorted(losses["ddp"]) == list(range(1, 11))
    for step, loss in losses["ddp"].items():
        assert abs(loss - losses["fsdp"][step]) <= LOSS_TOLERANCE, (step, loss, losses["fsdp"][step])

