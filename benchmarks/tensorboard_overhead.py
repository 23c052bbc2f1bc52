"""Step time with TensorBoard events on vs off, side by side in one process.

The same Trainer (cifar10-convnet, synthetic data, one CPU process) runs
alternately with `training.tensorboard.enabled` false and true, writing events
to a scratch workdir at the default cadence (a log step every 20 steps).
Prints each run, the median step times and on/off (goal: <= 1.01). It also
times one log step's TensorBoard calls alone (six scalars into the writer's
queue), which bounds the overhead independently of machine noise.

    python benchmarks/tensorboard_overhead.py [--steps 200] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time

import torch

from trainer.config import trainer_config_from_values
from trainer.values import resolve_values
from trainer.worker.distributed import resolve_rank
from trainer.worker.loop import Trainer
from trainer.worker.tensorboard import TensorBoardLogger


def config(steps: int, batch: int, tensorboard: bool, workdir: str):
    values = resolve_values(set_values=[
        f"training.maxSteps={steps},training.batchSize={batch},training.epochs=1000",
        "training.data.trainSamples=8192,training.data.evalSamples=1,metrics.enabled=false",
        f"training.tensorboard.enabled={str(tensorboard).lower()},training.exportModel=false",
    ])
    return dataclasses.replace(trainer_config_from_values("bench", values), workdir=workdir)


def step_seconds(cfg) -> float:
    """Mean wall time per optimizer step of one fit()."""
    summary = Trainer(cfg, resolve_rank({}), torch.device("cpu")).fit()
    return summary["wall_seconds"] / summary["steps"]


def log_step_microseconds(workdir: str, calls: int = 2000) -> float:
    """One log step's TensorBoard work: the gather (a no-op on one rank) and six scalars."""
    board = TensorBoardLogger(config(1, 32, True, workdir), resolve_rank({}), torch.device("cpu"))
    board.start(0)
    grad_norm = torch.tensor(1.5)
    start = time.perf_counter()
    for step in range(calls):
        board.log_train(step, 0.5, 1e-3, grad_norm, 1000.0, board.step_times(0.01))
    elapsed = time.perf_counter() - start
    board.close()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as workdir:
        on_cfg, off_cfg = (config(args.steps, args.batch, flag, workdir) for flag in (True, False))
        step_seconds(config(20, args.batch, True, workdir))  # warm up kernels and import tensorboard once
        off, on = [], []
        for i in range(args.repeats):
            first, second = (off_cfg, on_cfg) if i % 2 == 0 else (on_cfg, off_cfg)  # take turns going first
            for cfg in (first, second):
                (on if cfg is on_cfg else off).append(step_seconds(cfg))
            print(f"repeat {i + 1}: tensorboard off {off[-1] * 1e3:7.3f} ms/step   on {on[-1] * 1e3:7.3f} ms/step",
                  flush=True)
        hook = log_step_microseconds(workdir)
    median_off, median_on = statistics.median(off), statistics.median(on)
    every = off_cfg.training.log_every_steps
    print(f"median: off {median_off * 1e3:.3f} ms/step, on {median_on * 1e3:.3f} ms/step, "
          f"ratio on/off = {median_on / median_off:.4f} "
          f"({args.repeats} repeats x {args.steps} steps, batch {args.batch}, {args.threads} thread(s), "
          f"a log step every {every})")
    paired = statistics.median(a / b for a, b in zip(on, off))
    print(f"median of the {args.repeats} paired on/off ratios = {paired:.4f}")
    print(f"one log step's TensorBoard calls: {hook:.1f} us = "
          f"{hook / (every * median_off * 1e6) * 100:.3f}% of the {every} steps between them")


if __name__ == "__main__":
    main()
