"""causal-lm: tiny Llama- and Qwen2-shaped models (random weights, a tokenizer trained here) fine-tuned
with LoRA and in full, under DDP and FSDP2 at 2 gloo ranks, from model folders on an S3 server
(SeaweedFS, a real one; moto, a mock) or on disk. The exported folders load with transformers and peft and reproduce
the run's eval loss; held-out prompts are answered far more often than before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="causal-lm needs the nlp extra: pip install 'kubetrain[nlp]'")

import torch  # noqa: E402

from fixtures.llm import save_tiny_model, upload_folder  # noqa: E402
from support import run_cli  # noqa: E402

BUCKET = "llm-weights"
ENV = {"OMP_NUM_THREADS": "1"}
EVAL_SAMPLES, SEED = 64, 1234
# Per method: what learns the synthetic task in a few dozen steps on 2 CPU ranks.
METHODS = {
    "lora": {"finetune": {"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
             "optimizer": {"lr": 0.01}},
    "full": {"finetune": {"method": "full"}, "optimizer": {"lr": 0.004}},
}


def values(pretrained: str, method: str, parallelism: str, **training) -> dict:
    return {
        "job": {"nodes": 2, "nprocPerNode": 1}, "metrics": {"enabled": False},
        "training": {
            "task": "causal-lm", "pretrained": pretrained, "parallelism": parallelism, "seed": SEED,
            "batchSize": 16, "epochs": 3, "maxSteps": 90, "logEverySteps": 10, "lrSchedule": {"warmupSteps": 4},
            "data": {"trainSamples": 960, "evalSamples": EVAL_SAMPLES},
            "options": {"evalPrompts": 2, "maxNewTokens": 3}, **METHODS[method], **training,
        },
    }


def train(tmp_path: Path, values_file, name: str, vals: dict, env: dict | None = None, *extra: str):
    result = run_cli("run", name, "-f", str(values_file(vals)), "--workdir", str(tmp_path / name), *extra,
                     env={**ENV, **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    return result


# ------------------------------------------------------------------ what a user checks on the export
def held_out_rows(tokenizer):
    from trainer.tasks._llm_data import synthetic_rows

    return synthetic_rows(EVAL_SAMPLES, SEED + 1, chat=bool(tokenizer.chat_template))


@torch.no_grad()
def judge(model, tokenizer) -> tuple[float, float]:
    """(token-weighted eval loss on the run's held-out set, share of held-out prompts whose greedy
    answer starts with the right word)."""
    from trainer.tasks._llm_data import (CausalCollate, TokenDataset, Tokenize, WithLengths, prompt_of,
                                         tokenize_rows)
    from trainer.tasks.causal_lm import causal_lm_loss, label_counts

    model.eval()
    rows = held_out_rows(tokenizer)
    fmt = "chat" if tokenizer.chat_template else "prompt-completion"
    examples = WithLengths(TokenDataset(tokenize_rows(rows, Tokenize(tokenizer, fmt, 2048, False, "test"))))
    collate = CausalCollate(tokenizer.pad_token_id)
    total = count = 0.0
    for start in range(0, len(examples), 16):
        inputs, labels = collate([examples[i] for i in range(start, min(start + 16, len(examples)))])
        outputs = model(**inputs)
        n, _ = label_counts(outputs, labels)
        total += causal_lm_loss(outputs, labels).double().item() * n.item()
        count += n.item()
    right = 0
    for row in rows[:24]:
        prompt, expected = prompt_of(row, fmt)
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()
        right += answer[:1] == expected.split()
    return total / count, right / 24


def load(folder: Path, adapter: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model, AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-models")
    folders = {arch: save_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}
    before = {arch: judge(*load(folder)) for arch, folder in folders.items()}
    return folders, before


@pytest.fixture(scope="module")
def weights_bucket(s3_server, models, tmp_path_factory):
    """The model folders, and the synthetic task's rows as files: training rows as Parquet, eval rows as
    JSONL (the rows `training.data.source: synthetic` makes, so the judge's held-out set is the run's)."""
    import datasets

    from fixtures.llm import write_jsonl
    from trainer.tasks._llm_data import synthetic_rows

    s3_server.create_bucket(BUCKET)
    folders, _ = models
    uris = {arch: upload_folder(s3_server, BUCKET, folder, f"models/{arch}") for arch, folder in folders.items()}
    root = tmp_path_factory.mktemp("llm-data")
    datasets.Dataset.from_list(synthetic_rows(960, SEED, chat=True)).to_parquet(str(root / "train.parquet"))
    write_jsonl(root / "eval.jsonl", synthetic_rows(EVAL_SAMPLES, SEED + 1, chat=True))
    client = s3_server.client()
    for name in ("train.parquet", "eval.jsonl"):
        client.upload_file(str(root / name), BUCKET, f"data/{name}")
    uris["data"] = {"source": "file", "path": f"s3://{BUCKET}/data/train.parquet",
                    "evalPath": f"s3://{BUCKET}/data/eval.jsonl"}
    return uris


def check_learned_and_export(tmp_path: Path, name: str, result, arch: str, models, lora: bool) -> None:
    folders, before = models
    summary = result.summary
    assert summary["status"] == "succeeded" and summary["world_size"] == 2, summary
    export = tmp_path / name / "model"
    assert summary["model"] == export.as_uri(), summary
    assert (export / "config.json").is_file() and (export / "generation_config.json").is_file()
    assert list(export.glob("*.safetensors")) and (export / "tokenizer.json").is_file()
    assert not (export / "adapter_config.json").exists()  # the adapter is a sibling, not inside
    loss, answered = judge(*load(export))
    untrained_loss, untrained_answered = before[arch]
    assert loss < 0.5 * untrained_loss, (loss, untrained_loss)
    assert answered >= 0.5 and untrained_answered <= 0.15, (answered, untrained_answered)
    assert loss == pytest.approx(summary["eval_loss"], rel=1e-4), (loss, summary["eval_loss"])
    print(f"{name}: eval loss {untrained_loss:.3f} -> {loss:.3f}, held-out answers "
          f"{untrained_answered:.2f} -> {answered:.2f}")
    if lora:
        adapter = tmp_path / name / "adapter"
        assert summary["adapter"] == adapter.as_uri(), summary
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
        adapted, _ = judge(*load(folders[arch], adapter))
        assert adapted == pytest.approx(summary["eval_loss"], rel=1e-4)
    else:
        assert "adapter" not in summary


@pytest.mark.parametrize("method,parallelism,arch", [("lora", "ddp", "llama"), ("full", "fsdp", "qwen2")])
def test_fine_tunes_from_a_model_folder_and_data_files_on_s3(tmp_path, values_file, models, weights_bucket, s3_server,
                                              method, parallelism, arch):
    vals = values(f"{weights_bucket[arch]}/", method, parallelism, data=weights_bucket["data"])
    vals["s3"] = {"endpoint": s3_server.endpoint}
    cache = {"KUBETRAIN_WEIGHTS_CACHE": str(tmp_path / "node-cache")}
    result = train(tmp_path, values_file, f"{method}-{parallelism}", vals, {**s3_server.env, **cache})
    # Both replicas run on this machine, one node-local cache: one of them downloads, the other reuses.
    assert result.stdout.count("fetched s3://") == 1, result.stdout
    assert result.stdout.count("already in the node's cache") == 1, result.stdout
    assert "causal-lm data: chat format (file), 960 training and 64 eval examples" in result.stdout
    check_learned_and_export(tmp_path, f"{method}-{parallelism}", result, arch, models, method == "lora")


@pytest.mark.parametrize("method,parallelism,arch", [("lora", "fsdp", "qwen2"), ("full", "ddp", "llama")])
def test_fine_tunes_from_a_local_model_folder(tmp_path, values_file, models, method, parallelism, arch):
    folders, _ = models
    result = train(tmp_path, values_file, f"{method}-{parallelism}",
                   values(folders[arch].as_uri(), method, parallelism))
    check_learned_and_export(tmp_path, f"{method}-{parallelism}", result, arch, models, method == "lora")
    assert result.summary["tokens_per_second"] > 0  # counted on every rank, padding excluded


# ------------------------------------------------------------------ resume
def step_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "steps.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("method,parallelism,arch,options", [
    ("lora", "ddp", "llama", {"packing": True, "maxSeqLength": 48}),
    ("full", "fsdp", "qwen2", {}),
])
def test_resuming_mid_epoch_repeats_the_uninterrupted_steps_bit_for_bit(tmp_path, values_file, models, method,
                                                                        parallelism, arch, options):
    folders, _ = models
    store = (tmp_path / "store").as_uri()
    vals = values(folders[arch].as_uri(), method, parallelism, maxSteps=12, batchSize=8, stepLogFile="steps.jsonl",
                  options={"evalPrompts": 1, "maxNewTokens": 2, **options})
    vals["checkpoint"] = {"uri": store, "everySteps": 5, "keepLast": 3}
    vals["training"]["tensorboard"] = {"enabled": False}
    first = train(tmp_path, values_file, "first", vals)
    if options.get("packing"):
        assert "packing:" in first.stdout and "sequences of 48 tokens" in first.stdout
    step = tmp_path / "store" / "first" / "step-00000005"
    if method == "lora":  # the adapters and their optimizer state only, not the frozen base
        import torch as t

        saved = t.load(step / "model.pt", weights_only=True)
        assert saved and all(".lora_" in k for k in saved), list(saved)[:5]
        base = sum(p.stat().st_size for p in folders[arch].glob("*.safetensors"))
        print(f"LoRA step model.pt: {(step / 'model.pt').stat().st_size} bytes, base model {base} bytes")
    else:
        assert (step / "dcp" / ".metadata").is_file() and not (step / "model.pt").exists()
    # The same run resumed from step 5 in a fresh workdir: steps 6..12 repeat exactly.
    vals["checkpoint"]["resume"] = 5
    again = run_cli("run", "first", "-f", str(values_file(vals)), "--workdir", str(tmp_path / "again"), env=ENV,
                    timeout=600)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-2000:]
    assert "resumed from" in again.stdout
    reference, resumed = step_losses(tmp_path / "first"), step_losses(tmp_path / "again")
    assert sorted(resumed) == list(range(6, 13))
    assert resumed == {s: reference[s] for s in resumed}
    assert again.summary["train_loss"] == first.summary["train_loss"]


# ------------------------------------------------------------------ bad input: one clear line, exit 2
def fail(tmp_path, *sets: str) -> str:
    args = ["--set", "job.nodes=1,metrics.enabled=false,training.task=causal-lm,training.maxSteps=2"]
    for s in sets:
        args += ["--set", s]
    result = run_cli("run", "bad", "--workdir", str(tmp_path / "bad"), *args, env=ENV)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout + result.stderr


def copy_without(folder: Path, tmp_path: Path, *names: str) -> Path:
    import shutil

    target = tmp_path / "model"
    shutil.copytree(folder, target)
    for name in names:
        for path in target.glob(name):
            path.unlink()
    return target


def test_a_folder_without_config_or_tokenizer_is_refused_by_name(tmp_path, models):
    folders, _ = models
    no_config = copy_without(folders["llama"], tmp_path / "a", "config.json")
    assert "has no config.json: not a save_pretrained model folder" in fail(
        tmp_path, f"training.pretrained={no_config.as_uri()}")
    no_tokenizer = copy_without(folders["llama"], tmp_path / "b", "tokenizer*")
    assert "has no tokenizer" in fail(tmp_path, f"training.pretrained={no_tokenizer.as_uri()}")


def test_chat_rows_need_a_chat_template(tmp_path, models):
    from fixtures.llm import write_jsonl

    folders, _ = models
    plain = copy_without(folders["llama"], tmp_path, "chat_template.jinja")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    rows = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "one"}]}] * 20)
    out = fail(tmp_path, f"training.pretrained={plain.as_uri()}", "training.data.source=file",
               f"training.data.path={rows}")
    assert "chat data (`messages`) needs a tokenizer with a chat template" in out


def test_target_modules_the_model_lacks_are_named_with_the_ones_it_has(tmp_path, models):
    folders, _ = models
    out = fail(tmp_path, f"training.pretrained={folders['llama'].as_uri()}", "training.finetune.method=lora",
               "training.finetune.lora.targetModules={q_proj,qkv}")
    assert "no linear layer named qkv; its linear layers are " in out and "gate_proj" in out


def test_values_mistakes_are_refused_before_any_replica_starts(tmp_path, models):
    folders, _ = models
    uri = f"training.pretrained={folders['llama'].as_uri()}"
    for sets, message in [
        (["training.finetune.method=adapter"], "training.finetune.method: 'adapter' is not one of"),
        (["training.options.packing=true"], "training.options.packing needs training.options.maxSeqLength"),
        (["training.task=cifar10-convnet,training.finetune.method=lora"], "lora and qlora are for training.task"),
    ]:
        out = fail(tmp_path, uri, *sets)
        assert message in out and "[master-0]" not in out, out[-2000:]


def test_qlora_on_cpu_says_it_needs_a_gpu(tmp_path, models):
    folders, _ = models
    out = fail(tmp_path, f"training.pretrained={folders['llama'].as_uri()}", "training.finetune.method=qlora")
    assert "qlora needs a CUDA GPU" in out


def test_prompt_completion_file_with_long_rows_truncates_and_counts_them(tmp_path, values_file, models):
    from fixtures.llm import write_jsonl

    folders, _ = models
    rows = [{"prompt": "say the number after three .", "completion": " four"}] * 40
    rows += [{"prompt": "count : " + " ".join(["one two three"] * 20), "completion": " four"}] * 5
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    vals = values(folders["llama"].as_uri(), "full", "ddp", maxSteps=2, batchSize=4,
                  options={"maxSeqLength": 24, "evalPrompts": 1, "maxNewTokens": 2},
                  data={"source": "file", "path": str(path)})
    vals["job"]["nodes"] = 1
    result = train(tmp_path, values_file, "trunc", vals)
    assert "prompt-completion format (file)" in result.stdout
    assert re.search(r"\b[45] rows truncated to maxSeqLength", result.stdout), result.stdout[-3000:]


# ------------------------------------------------------------------ memory
def test_fsdp_ranks_read_only_their_shards_and_never_hold_the_whole_model(tmp_path, values_file):
    """A 52M-parameter (208 MB in fp32) model at 2 ranks: each rank reads half of the weights, and its
    peak memory grows by far less than one whole copy while loading."""
    folder = save_tiny_model(tmp_path / "big", arch="llama", hidden=768, layers=8, intermediate=2048,
                             shard_size="50MB")
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    vals = values(folder.as_uri(), "full", "fsdp", maxSteps=1, batchSize=2, exportModel=False,
                  data={"trainSamples": 64, "evalSamples": 4}, options={"evalPrompts": 0})
    vals["training"]["tensorboard"] = {"enabled": False}
    result = train(tmp_path, values_file, "memory", vals)
    loads = re.findall(r"rank=(\d) .*weights: read ([\d.]+) MB .*peak RSS (\d+) MB, \+(-?\d+) MB while loading",
                       result.stdout)
    assert sorted(rank for rank, *_ in loads) == ["0", "1"], result.stdout[-3000:]
    for rank, read_mb, peak_mb, grew_mb in loads:
        print(f"rank {rank}: read {read_mb} MB of {model_bytes / 1e6:.0f} MB, peak RSS {peak_mb} MB, "
              f"+{grew_mb} MB while loading")
        assert float(read_mb) * 1e6 < 0.55 * model_bytes
        assert int(grew_mb) * 1e6 < 0.75 * model_bytes


def test_activation_checkpointing_recomputes_to_the_same_losses(tmp_path, values_file, models):
    """Recomputing each decoder layer in the backward pass changes memory, not the numbers."""
    folders, _ = models
    losses = {}
    for flag in (False, True):
        vals = values(folders["llama"].as_uri(), "lora", "fsdp", maxSteps=6, stepLogFile="steps.jsonl",
                      activationCheckpointing=flag, options={"evalPrompts": 0})
        vals["training"]["tensorboard"] = {"enabled": False}
        result = train(tmp_path, values_file, f"ac-{str(flag).lower()}", vals)
        assert ("activation checkpointing: 2 layers recompute" in result.stdout) == flag
        losses[flag] = step_losses(tmp_path / f"ac-{str(flag).lower()}")
    assert sorted(losses[True]) == list(range(1, 7))
    assert losses[True] == pytest.approx(losses[False], rel=1e-5), losses
