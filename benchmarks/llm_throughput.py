"""causal-lm fine-tuning tokens/s (and MFU on GPUs): our loop vs a plain transformers + peft loop.

The model is a Llama-shaped model built from a config with random weights (no download): `--size tiny`
(hidden 64, 2 layers) for CPUs, `--size 1b` (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192:
about 1 B parameters) for a GPU. The data is a JSONL of `text` rows longer than `--seq` tokens, so every
sequence is exactly `--seq` tokens after truncation and neither side pads. Ours: kubetrain's Trainer on
task causal-lm (source file, pretrained file://). Plain: the same folder and rows in the loop a
transformers user writes (tokenize and truncate, DataLoader, AdamW, `model(..., labels=...).loss`), with
peft's get_peft_model for LoRA. Both are timed by the same hooks as benchmarks/loop_vs_plain.py (first
batch fetched to last optimizer step). MFU = tokens/s x FLOPs per token / the device's dense bf16 peak,
with FLOPs per token = 6 x parameters (full) or 4 x base parameters (LoRA: no weight gradients for the
frozen base) + 12 x layers x hidden x seq for attention.

    python benchmarks/llm_throughput.py [--size tiny|1b] [--method lora|full] [--steps 40] [--repeats 5]

Ours also exports at the end of its last run; with --vllm that folder is loaded by vLLM and asked
for a few greedy completions (needs vllm installed: CUDA only).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_vs_plain import SpanClock  # noqa: E402

from trainer.config import trainer_config_from_values  # noqa: E402
from trainer.values import resolve_values  # noqa: E402
from trainer.worker.distributed import resolve_rank  # noqa: E402
from trainer.worker.efficiency import table_peak  # noqa: E402  (the trainer's peak table, for MFU)

SIZES = {
    "tiny": dict(hidden=64, layers=2, intermediate=128),
    "small": dict(hidden=256, layers=4, intermediate=688),
    "1b": dict(hidden=2048, layers=16, intermediate=8192),
}
GOAL_MFU = 0.40
LORA = dict(rank=16, alpha=32, dropout=0.0)


def make_model(folder: Path, size: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.tasks.causal_lm import train_tiny_tokenizer

    shape = SIZES[size]
    tokenizer = train_tiny_tokenizer(folder)
    heads = 32 if size == "1b" else 4
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         intermediate_size=shape["intermediate"], num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if size == "1b" else torch.float32).save_pretrained(str(folder))


def make_data(path: Path, rows: int, seq: int) -> None:
    from trainer.tasks._llm_data import SYNTHETIC_WORDS

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(seq + 32))}) + "\n")


def ours(folder: Path, data: Path, args, device: torch.device, workdir: Path) -> tuple[float, int]:
    import dataclasses

    from trainer.worker.loop import Trainer

    values = resolve_values(set_values=[
        f"training.task=causal-lm,training.pretrained={folder.as_uri()},training.precision={args.precision}",
        f"training.data.source=file,training.data.path={data},training.finetune.method={args.method}",
        f"training.batchSize={args.batch},training.maxSteps={args.steps},training.epochs=1000",
        f"training.options.maxSeqLength={args.seq},training.options.evalPrompts=0,training.logEverySteps=1000",
        "training.gradClipNorm=0,training.lrSchedule.name=constant,training.lrSchedule.warmupSteps=0",
        f"training.activationCheckpointing={str(args.checkpointing).lower()},training.tensorboard.enabled=false",
        f"training.finetune.lora.rank={LORA['rank']}",
    ], set_json=["training.data.evalSamples=1", f"training.finetune.lora.alpha={LORA['alpha']}",
                 f"training.finetune.lora.dropout={LORA['dropout']}"])
    config = dataclasses.replace(trainer_config_from_values("bench", values), workdir=str(workdir))
    trainer = Trainer(config, resolve_rank({}), device)
    trainer.eval_loader = None  # the figure is training throughput
    clock = SpanClock(trainer.raw_model, trainer.optimizer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return clock.samples_per_second(args.batch) * args.seq, peak


def plain(folder: Path, data: Path, args, device: torch.device) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:args.seq] for text in rows]
    loader = torch.utils.data.DataLoader(torch.tensor(ids), batch_size=args.batch, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    clock = SpanClock(model, optimizer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done = 0
    model.train()
    while done < args.steps:
        for batch in loader:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == args.steps:
                break
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return clock.samples_per_second(args.batch) * args.seq, peak


def flops_per_token(folder: Path, method: str, seq: int) -> float:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return (6 if method == "full" else 4) * params + 12 * config.num_hidden_layers * config.hidden_size * seq


def serve_with_vllm(folder: Path) -> None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vllm: not installed here, the export was not served (pip install vllm on a CUDA machine)")
        return
    llm = LLM(model=str(folder), dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True)
    outputs = llm.generate(["one two three", "what comes after seven ?"], SamplingParams(max_tokens=8, temperature=0))
    for out in outputs:
        print(f"vllm: {out.prompt!r} -> {out.outputs[0].text!r}")
    print(f"vllm: loaded and served {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    parser.add_argument("--vllm", action="store_true", help="serve our last export with vLLM")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="kubetrain-llm-bench-") as tmp:
        folder, data = Path(tmp, "model"), Path(tmp, "train.jsonl")
        make_model(folder, args.size)
        make_data(data, rows=max(512, args.batch * args.steps + 64), seq=args.seq)
        per_token = flops_per_token(folder, args.method, args.seq)
        rates, peaks = {"plain": [], "ours": []}, {"plain": 0, "ours": 0}
        for i in range(args.repeats):
            for side in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                rate, peak = (ours(folder, data, args, device, Path(tmp, f"run{i}")) if side == "ours"
                              else plain(folder, data, args, device))
                rates[side].append(rate)
                peaks[side] = max(peaks[side], peak)
                print(f"  repeat {i + 1} {side:>5}: {rate:10.0f} tokens/s", flush=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak_flops = table_peak(name, "bf16") if args.precision == "bf16" else None
        print(f"\n{name}, Llama-shaped {args.size} ({per_token / 6e6 if args.method == 'full' else per_token / 4e6:.1f}"
              f" M params), {args.method}, {args.precision}, batch {args.batch} x seq {args.seq}, medians of "
              f"{args.repeats} alternating x {args.steps} steps")
        print(f"{'loop':>6} {'tokens/s':>10} {'MFU':>7} {'peak GPU memory':>16}")
        for side in ("plain", "ours"):
            tokens = statistics.median(rates[side])
            mfu = f"{tokens * per_token / peak_flops:.1%}" if peak_flops else "n/a"
            memory = f"{peaks[side] / 2**30:.1f} GiB" if peaks[side] else "n/a"
            print(f"{side:>6} {tokens:>10.0f} {mfu:>7} {memory:>16}")
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["plain"])
        print(f"ours/plain {ratio:.3f} (goal >= 0.95)" + (f"; goal MFU >= {GOAL_MFU:.0%} for full on an H100/H200"
                                                         if peak_flops else "; no bf16 peak for this device: no MFU"))
        if args.vllm:
            serve_with_vllm(Path(tmp, f"run{args.repeats - 1}", "model"))


if __name__ == "__main__":
    main()
