"""A LoRA causal-lm job on the real node: examples/llm-lora.yaml with the node tier's image and a CPU's
overrides, the model folder and the chat JSONL on the in-node S3 server, as a PyTorchJob and the same
values as a TrainJob, in a restricted namespace. The export on S3 reloads with transformers and peft
to the run's own eval loss and answers held-out prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("peft", reason="causal-lm needs the nlp extra: pip install 'kubetrain[nlp]'")

from fixtures.llm import save_tiny_model, upload_folder, write_jsonl  # noqa: E402
from nodejobs import create_s3_secret, kt, s3_values, summary_line, tier_values, wait_for_state  # noqa: E402
from support import EXAMPLES  # noqa: E402

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def llm_on_s3(node_s3, tmp_path_factory):
    from trainer.tasks._llm_data import synthetic_rows

    root = tmp_path_factory.mktemp("llm")
    node_s3.create_bucket("models")
    node_s3.create_bucket("data")
    node_s3.create_bucket("ckpt")
    model = upload_folder(node_s3, "models", save_tiny_model(root / "tiny-llama"), "tiny-llama")
    rows = write_jsonl(root / "chat.jsonl", synthetic_rows(960, 7, chat=True))
    node_s3.client().upload_file(str(rows), "data", "chat/train.jsonl")
    return root / "tiny-llama", model, "s3://data/chat/train.jsonl"


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_a_lora_fine_tune_from_s3_succeeds_and_its_export_on_s3_reloads(node, node_ns, node_s3, llm_on_s3, tmp_path,
                                                                        monkeypatch, kind):
    folder, model_uri, data_uri = llm_on_s3
    create_s3_secret(node, node_ns)
    name = f"llm-{kind.lower()}"
    submitted = kt(node, node_ns, "submit", name, "-f", str(EXAMPLES / "llm-lora.yaml"), *tier_values(),
                   "--set", f"job.kind={kind},resources.gpu=0,shm.sizeLimit=256Mi,training.precision=fp32",
                   "--set", f"training.pretrained={model_uri},training.data.path={data_uri}",
                   "--set", "training.gradAccumSteps=1,training.batchSize=16,training.epochs=4,training.maxSteps=80",
                   "--set", "training.options.packing=false,training.options.maxSeqLength=64",
                   "--set", "training.lrSchedule.warmupSteps=4,training.finetune.lora.rank=8",
                   "--set-json", "training.optimizer.lr=0.01", "--set-json", "training.finetune.lora.alpha=16",
                   "--set-json", "training.finetune.lora.dropout=0", "--set", "checkpoint.everySteps=0",
                   *s3_values(node_s3.endpoint, "s3://ckpt/runs"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wait_for_state(node, node_ns, name, {"Succeeded", "Failed"}, timeout=1200, kind=kind)
    logs = kt(node, node_ns, "logs", name).stdout
    status = kt(node, node_ns, "status", name)
    assert status.returncode == 0 and "Succeeded" in status.stdout, status.stdout[-2000:] + logs[-4000:]
    assert "causal-lm data: chat format (file)" in logs and f"fetched {model_uri}" in logs, logs[-4000:]
    summary = summary_line(logs)
    assert summary["model"] == f"s3://ckpt/runs/{name}/model", summary
    assert summary["adapter"] == f"s3://ckpt/runs/{name}/adapter", summary

    # What a user does next: copy the export down and load it with transformers and peft.
    from test_causal_lm import judge, load

    client = node_s3.client()
    for part in ("model", "adapter"):
        for key in node_s3.keys("ckpt", f"runs/{name}/{part}/"):
            target = tmp_path / part / key.rsplit("/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("ckpt", key, str(target))
    untrained, untrained_answered = judge(*load(folder))
    loss, answered = judge(*load(tmp_path / "model"))
    print(f"node {kind}: eval loss {untrained:.3f} -> {loss:.3f} (run said {summary['eval_loss']:.3f}), "
          f"held-out answers {untrained_answered:.2f} -> {answered:.2f}")
    assert loss < 0.5 * untrained and answered >= 0.4 and untrained_answered <= 0.1
    adapted, _ = judge(*load(folder, tmp_path / "adapter"))
    assert adapted == pytest.approx(loss, rel=1e-4)
