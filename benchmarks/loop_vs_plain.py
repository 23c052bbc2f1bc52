"""Our training loop vs the plain loop of the PyTorch "Training a classifier" tutorial.

Same model (the cifar10-convnet ConvNet), same synthetic data, batch size and
AdamW optimizer, one CPU process. Runs alternate (plain, ours, plain, ...) so
machine noise hits both alike; prints each run, the medians and ours/plain.

    python benchmarks/loop_vs_plain.py [--steps 150] [--repeats 5] [--threads 1]

Our loop is configured like the tutorial's (no clipping, constant LR, no
warmup) so the ratio measures the loop's own overhead: DistributedSampler,
autocast/GradScaler plumbing, accumulation bookkeeping, progress logging.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from trainer.config import trainer_config_from_values
from trainer.tasks import get_task
from trainer.values import resolve_values
from trainer.worker.distributed import resolve_rank
from trainer.worker.loop import Trainer


def config(steps: int, batch: int):
    values = resolve_values(set_values=[
        f"training.maxSteps={steps},training.batchSize={batch},training.epochs=1000",
        "training.gradClipNorm=0,training.lrSchedule.name=constant,training.lrSchedule.warmupSteps=0",
        "training.data.trainSamples=8192,training.data.evalSamples=1,training.logEverySteps=50",
        "training.optimizer.weightDecay=0",
    ])
    return trainer_config_from_values("bench", values)


def plain_loop(cfg, steps: int) -> float:
    """The tutorial's loop, verbatim in spirit. Returns samples/s."""
    t = cfg.training
    torch.manual_seed(t.seed)
    spec = get_task(t.task)(t)
    net, criterion = spec.model, nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.optimizer.lr, weight_decay=0)
    loader = torch.utils.data.DataLoader(spec.train_dataset, batch_size=t.batch_size, shuffle=True,
                                         drop_last=True)
    start, done, running_loss = time.perf_counter(), 0, 0.0
    while done < steps:
        for inputs, labels in loader:
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += 1
            if done == steps:
                break
    return steps * t.batch_size / (time.perf_counter() - start)


def our_loop(cfg) -> float:
    trainer = Trainer(cfg, resolve_rank({}), torch.device("cpu"))
    return trainer.fit()["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = config(args.steps, args.batch)
    plain, ours = [], []
    plain_loop(cfg, 10)  # warm up allocator and kernels once for both
    for i in range(args.repeats):
        plain.append(plain_loop(cfg, args.steps))
        ours.append(our_loop(cfg))
        print(f"repeat {i + 1}: plain {plain[-1]:8.1f} samples/s   ours {ours[-1]:8.1f} samples/s", flush=True)
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"median: plain {p:.1f} samples/s, ours {o:.1f} samples/s, ratio ours/plain = {o / p:.3f} "
          f"({args.repeats} repeats x {args.steps} steps, batch {args.batch}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
