"""BERT-base fine-tuning in bf16: tokens/s and MFU, our loop vs a plain Hugging Face loop.

The model is BERT-base's shape (hidden 768, 12 layers, 12 heads, FFN 3072) with
random weights and a small WordPiece vocabulary, saved like a hub model (no
download). The data is a CSV of texts longer than `--seq` tokens, so every
sequence is exactly `--seq` tokens after truncation. Ours: `kubetrain`'s
Trainer on task bert-sentiment (source file, pretrained file://). Plain: the
same model and data in the Hugging Face fine-tuning loop written out (DataLoader,
AdamW, torch.autocast bf16). Both are timed by the same hooks as
benchmarks/loop_vs_plain.py. MFU = tokens/s x (6 x non-embedding parameters +
12 x layers x hidden x seq) / the device's dense bf16 peak.

    python benchmarks/bert_throughput.py [--steps 60] [--repeats 3] [--batch 32] [--seq 128] [--tiny]

`--tiny` (hidden 32, 2 layers) runs anywhere in seconds: the CPU-safe check of the script.
"""

from __future__ import annotations

import argparse
import csv
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

GOAL_MFU = 0.40


def make_model(folder: Path, tiny: bool):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from trainer.tasks.bert_sentiment import SYNTHETIC_WORDS

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SYNTHETIC_WORDS]))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    config = BertConfig(vocab_size=len(tokenizer), num_labels=2, **shape)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config, sorted(set(SYNTHETIC_WORDS))


def make_data(path: Path, words: list[str], rows: int, seq: int) -> None:
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            writer.writerow([" ".join(rng.choice(words) for _ in range(seq + 16)), rng.randint(0, 1)])


def flops_per_token(model: torch.nn.Module, config, seq: int) -> float:
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * dense + 12 * config.num_hidden_layers * config.hidden_size * seq


def ours(folder: Path, data: Path, args, device: torch.device) -> float:
    from trainer.worker.loop import Trainer

    values = resolve_values(set_values=[
        f"training.task=bert-sentiment,training.pretrained={folder.as_uri()},training.precision=bf16",
        f"training.data.source=file,training.data.path={data},training.data.numWorkers={args.workers}",
        f"training.batchSize={args.batch},training.maxSteps={args.steps},training.epochs=1000",
        f"training.options.maxLength={args.seq},training.logEverySteps=1000,training.gradClipNorm=0",
        "training.lrSchedule.name=constant,training.lrSchedule.warmupSteps=0",
    ])
    trainer = Trainer(trainer_config_from_values("bench", values), resolve_rank({}), device)
    clock = SpanClock(trainer.raw_model, trainer.optimizer, device)
    trainer.fit()
    return clock.samples_per_second(args.batch)


def plain(folder: Path, data: Path, args, device: torch.device) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device)
    with open(data, newline="") as f:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(f)]

    def collate(batch):
        encoded = tokenizer([t for t, _ in batch], padding="max_length", truncation=True, max_length=args.seq,
                            return_tensors="pt")
        return encoded, torch.tensor([label for _, label in batch])

    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=True, drop_last=True,
                                         collate_fn=collate, num_workers=args.workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    clock = SpanClock(model, optimizer, device)
    done = 0
    model.train()
    while done < args.steps:
        for encoded, labels in loader:
            encoded, labels = encoded.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**encoded, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == args.steps:
                break
    return clock.samples_per_second(args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="kubetrain-bert-bench-") as tmp:
        folder, data = Path(tmp, "bert"), Path(tmp, "train.csv")
        config, words = make_model(folder, args.tiny)
        make_data(data, words, rows=max(2048, args.batch * args.steps // 2), seq=args.seq)
        from transformers import AutoModelForSequenceClassification

        per_token = flops_per_token(AutoModelForSequenceClassification.from_pretrained(folder), config, args.seq)
        rates = {"plain": [], "ours": []}
        for i in range(args.repeats):
            for side in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                rates[side].append((plain if side == "plain" else ours)(folder, data, args, device) * args.seq)
                print(f"  repeat {i + 1} {side:>5}: {rates[side][-1]:10.0f} tokens/s", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = table_peak(name, "bf16")
    print(f"\n{name}, {'tiny BERT' if args.tiny else 'BERT-base'}, bf16, batch {args.batch} x seq {args.seq}, "
          f"{per_token / 1e6:.2f} MFLOP/token, medians of {args.repeats} alternating x {args.steps} steps")
    print(f"{'loop':>6} {'tokens/s':>10} {'MFU':>7}")
    for side in ("plain", "ours"):
        tokens = statistics.median(rates[side])
        mfu = f"{tokens * per_token / peak:.1%}" if peak else "n/a"
        print(f"{side:>6} {tokens:>10.0f} {mfu:>7}")
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["plain"])
    print(f"ours/plain {ratio:.3f}" + (f"; goal MFU >= {GOAL_MFU:.0%} on an H200" if peak else
                                         " (no bf16 peak known for this device: MFU not computed)"))


if __name__ == "__main__":
    main()
