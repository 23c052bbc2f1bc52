"""The cluster half of docs/tasks.md's fine-tuning walk-through, on a real node.

The doc's finetune.yaml, its package mounted from a ConfigMap, weights from S3:
the pod loads them (skipping the reshaped head), freezes the first layer, and
exports the model to S3, where `load_exported` reloads it to the run's accuracy.
"""

from __future__ import annotations

import io

import pytest
import torch

from nodejobs import (create_s3_secret, kt, mount_user_code, s3_values, summary_line, tier_values,
                      wait_for_state)
from support import EXAMPLES
from test_docs_walkthrough import walkthrough_blocks

pytestmark = pytest.mark.timeout(1200)

TASK = EXAMPLES / "custom_model" / "tabular_mlp" / "task.py"


def test_a_custom_model_fine_tunes_from_s3_weights_and_exports_to_s3(node, node_ns, node_s3, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TASK.parent))  # `task:build`, as the pod imports it from the mount
    from task import MLP

    torch.manual_seed(3)
    weights = MLP(num_classes=3, hidden=64).state_dict()  # "your state dict", 3 classes
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    node_s3.create_bucket("models")
    node_s3.client().put_object(Bucket="models", Key="rings-3.pt", Body=buffer.getvalue())
    node_s3.create_bucket("ckpt")
    create_s3_secret(node, node_ns)

    (finetune,) = [body for kind, body in walkthrough_blocks() if kind == "yaml"]
    (tmp_path / "finetune.yaml").write_text(finetune)
    code = mount_user_code(node, node_ns, "rings-code", {"task.py": TASK.read_text()})
    submitted = kt(node, node_ns, "submit", "rings4", "-f", str(tmp_path / "finetune.yaml"), *tier_values(), *code,
                   "--set", "training.pretrained=s3://models/rings-3.pt,training.entrypoint=task:build",
                   *s3_values(node_s3.endpoint, "s3://ckpt/runs"))
    assert submitted.returncode == 0, submitted.stderr
    job = wait_for_state(node, node_ns, "rings4", {"Succeeded", "Failed"}, timeout=900)
    logs = kt(node, node_ns, "logs", "rings4").stdout
    assert job["status"]["conditions"][-1]["type"] == "Succeeded", logs[-3000:]
    assert ("training.pretrained: loaded 4 of the model's 6 tensors from s3://models/rings-3.pt; "
            "skipped, shape differs: head.bias, head.weight") in logs, logs[-3000:]
    assert "parameters: 4420 trainable, 192 frozen" in logs
    summary = summary_line(logs)
    assert summary["model"] == "s3://ckpt/runs/rings4/model", summary

    events = node_s3.keys("ckpt", "runs/rings4/tensorboard/")
    assert len(events) == 1 and next(iter(events)).endswith(".rank0"), events  # torchrun's rank 0 only

    from trainer.config import S3Config
    from trainer.export import load_exported

    for name, value in node_s3.env.items():
        monkeypatch.setenv(name, value)
    exported = load_exported("s3://ckpt/runs/rings4/model", S3Config(node_s3.endpoint, "us-east-1", "path", ""))
    loader = torch.utils.data.DataLoader(exported.spec.eval_dataset, batch_size=256)
    with torch.no_grad():
        correct = sum((exported.model(x).argmax(dim=-1) == y).sum().item() for x, y in loader)
    accuracy = correct / len(exported.spec.eval_dataset)
    print(f"node fine-tune: reloaded accuracy {accuracy}, run's eval_accuracy {summary['eval_accuracy']}")
    assert accuracy == summary["eval_accuracy"]
    assert exported.model.blocks[0][0].weight.equal(weights["blocks.0.0.weight"])  # frozen: as loaded
    assert exported.model.head.weight.shape == (4, 64)
