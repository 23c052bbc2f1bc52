"""Step time with /metrics on vs off, side by side in one process.

The same Trainer (cifar10-convnet, synthetic data, one CPU process) runs
alternately without metrics and with a MetricsProcessor that serves /metrics
while a thread scrapes it every `--scrape-interval` seconds, as Prometheus
would. Prints each run, the median step times and on/off (goal: <= 1.01).
It also times the per-step hook alone (`observe_step`), which bounds the
overhead independently of machine noise.

    python benchmarks/metrics_overhead.py [--steps 200] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
import urllib.request

import torch

from trainer.config import trainer_config_from_values
from trainer.controller.local import free_port
from trainer.values import resolve_values
from trainer.worker.distributed import resolve_rank
from trainer.worker.loop import Trainer
from trainer.worker.metrics import DISABLED, MetricsProcessor


def config(steps: int, batch: int):
    values = resolve_values(set_values=[
        f"training.maxSteps={steps},training.batchSize={batch},training.epochs=1000",
        "training.data.trainSamples=8192,training.data.evalSamples=1,training.logEverySteps=20",
    ])
    return trainer_config_from_values("bench", values)



def step_seconds(cfg, metrics: MetricsProcessor) -> float:
    """Mean wall time per optimizer step of one fit()."""
    summary = Trainer(cfg, resolve_rank({}), torch.device("cpu"), metrics).fit()
    return summary["wall_seconds"] / summary["steps"]


def with_metrics(cfg, scrape_interval: float, measure=None) -> float:
    """`measure(cfg, metrics)` (default: step_seconds) with /metrics served and scraped."""
    metrics = MetricsProcessor("bench", 0, free_port())
    metrics.start()
    stop = threading.Event()

    def scrape():
        while not stop.wait(scrape_interval):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5).read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        return (measure or step_seconds)(cfg, metrics)
    finally:
        stop.set()
        scraper.join()
        metrics.close(wait_for_scrape=False)


def hook_microseconds(calls: int = 20000) -> float:
    metrics = MetricsProcessor("bench", 0, 0)
    start = time.perf_counter()
    for _ in range(calls):
        metrics.observe_step(0.01, 0.001, 32, 1e-3, 0)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = config(args.steps, args.batch)
    step_seconds(config(20, args.batch), DISABLED)  # warm up allocator and kernels once for both
    off, on = [], []
    for i in range(args.repeats):
        off.append(step_seconds(cfg, DISABLED))
        on.append(with_metrics(cfg, args.scrape_interval))
        print(f"repeat {i + 1}: metrics off {off[-1] * 1e3:7.3f} ms/step   on {on[-1] * 1e3:7.3f} ms/step", flush=True)
    median_off, median_on = statistics.median(off), statistics.median(on)
    hook = hook_microseconds()
    print(f"median: off {median_off * 1e3:.3f} ms/step, on {median_on * 1e3:.3f} ms/step, "
          f"ratio on/off = {median_on / median_off:.4f} "
          f"({args.repeats} repeats x {args.steps} steps, batch {args.batch}, {args.threads} thread(s), "
          f"scrape every {args.scrape_interval:g}s)")
    print(f"per-step hook (observe_step): {hook:.2f} us = {hook / (median_off * 1e6) * 100:.3f}% of a step")


if __name__ == "__main__":
    main()
