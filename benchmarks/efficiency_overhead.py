"""Step time with the efficiency figures (and /metrics) on vs all off, side by side in one process.

The same Trainer runs a token task (tests/fixtures/token_stack.py: linear layers over padded
positions, so every step counts tokens) alternately (the order rotating from repeat to repeat)
- off: metrics disabled, no token counting, no FLOP count, no MFU;
- efficiency: tokens counted every micro-batch, the first step's FLOPs counted with
  FlopCounterMode, tokens/s and MFU at log steps; metrics still disabled;
- all on: the same with /metrics served and scraped every `--scrape-interval` s.
Prints each run, the median step times and each side over off (goal: <= 1.01). It also times the two costs
alone: the per-micro-batch token count (count_tokens + the device add) and the one-off FLOP count
of the first step, which bound the overhead independently of machine noise.

    python benchmarks/efficiency_overhead.py [--steps 1000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from trainer.config import trainer_config_from_values
from trainer.values import resolve_values
from trainer.worker.distributed import resolve_rank
from trainer.worker.efficiency import Efficiency
from trainer.worker.loop import Trainer
from trainer.worker.metrics import DISABLED
from trainer.worker.progress import LogWindow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_overhead import with_metrics  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


class NoEfficiency(Efficiency):
    """The loop as before the efficiency figures: nothing counted, no MFU, no GPU figures."""

    @contextlib.contextmanager
    def count(self, micro_batches: int, samples: int, announce: bool):
        yield

    def gpu_stats(self) -> dict:
        return {}


def config(steps: int, batch: int, peak: int):
    values = resolve_values(set_values=[
        f"training.maxSteps={steps},training.batchSize={batch},training.epochs=1000,training.logEverySteps=20",
        f"training.task=custom,training.entrypoint=token_stack:build,metrics.peakFlops={peak}",
    ], set_json=[f"training.pythonPath={json.dumps([str(FIXTURES)])}", 'training.options={"samples": 4096}'])
    return trainer_config_from_values("bench", values)


def run(cfg, metrics, efficiency: bool) -> float:
    """Mean wall time per optimizer step of one fit()."""
    trainer = Trainer(cfg, resolve_rank({}), torch.device("cpu"), metrics)
    if not efficiency:
        trainer.spec = dataclasses.replace(trainer.spec, count_tokens=None)
        trainer.efficiency = NoEfficiency(torch.device("cpu"), "fp32")
    summary = trainer.fit()
    return summary["wall_seconds"] / summary["steps"]


def token_count_microseconds(cfg, calls: int = 20000) -> float:
    """count_tokens on one micro-batch plus the add into the window's device counter."""
    trainer = Trainer(cfg, resolve_rank({}), torch.device("cpu"), DISABLED)
    batch = next(iter(trainer.train_loader))
    window = LogWindow(torch.device("cpu"), 20, 100, 8, 0)
    start = time.perf_counter()
    for _ in range(calls):
        window.add_tokens(trainer.spec.count_tokens(batch))
    return (time.perf_counter() - start) / calls * 1e6


def flop_count_milliseconds(cfg) -> float:
    """The first step's extra time under FlopCounterMode: counted step minus a plain step."""
    trainer = Trainer(cfg, resolve_rank({}), torch.device("cpu"), DISABLED)
    batch = next(iter(trainer.train_loader))
    trainer.train_step([batch])  # warm: the one-off count happens here
    plain, counted = [], []
    for _ in range(5):
        start = time.perf_counter()
        trainer.train_step([batch])
        plain.append(time.perf_counter() - start)
        trainer.efficiency.flops_per_step = None  # count again
        start = time.perf_counter()
        trainer.train_step([batch])
        counted.append(time.perf_counter() - start)
    return (statistics.median(counted) - statistics.median(plain)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(FIXTURES))
    cfg = config(args.steps, args.batch, 10**12)
    run(config(20, args.batch, 10**12), DISABLED, efficiency=False)  # warm up allocator and kernels once
    sides = {
        "off": lambda: run(cfg, DISABLED, efficiency=False),
        "efficiency": lambda: run(cfg, DISABLED, efficiency=True),
        "all on": lambda: with_metrics(cfg, args.scrape_interval, lambda c, m: run(c, m, efficiency=True)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    off, efficiency, on = times.values()
    for i in range(args.repeats):
        order = list(sides)[i % 3:] + list(sides)[:i % 3]  # each side runs first, second and last in turn
        for name in order:
            gc.collect()  # the last run's garbage is not collected on this one's clock
            times[name].append(sides[name]())
        print(f"repeat {i + 1}: off {off[-1] * 1e3:7.3f}   efficiency {efficiency[-1] * 1e3:7.3f}   "
              f"all on {on[-1] * 1e3:7.3f} ms/step", flush=True)
    median_off, median_eff, median_on = (statistics.median(x) for x in (off, efficiency, on))
    print(f"median: off {median_off * 1e3:.3f}, efficiency {median_eff * 1e3:.3f}, all on {median_on * 1e3:.3f} "
          f"ms/step; efficiency/off = {median_eff / median_off:.4f}, all on/off = {median_on / median_off:.4f} "
          f"({args.repeats} alternating repeats x {args.steps} steps, batch {args.batch} x 16 positions, "
          f"{args.threads} thread(s), scrape every {args.scrape_interval:g}s)")
    tokens = token_count_microseconds(cfg)
    flops = flop_count_milliseconds(cfg)
    print(f"token count per micro-batch: {tokens:.2f} us = {tokens / (median_off * 1e6) * 100:.3f}% of a step; "
          f"FLOP count of the first step: {flops:.2f} ms once = "
          f"{flops / (median_off * 1e3 * args.steps) * 100:.3f}% of this {args.steps}-step run")


if __name__ == "__main__":
    main()
