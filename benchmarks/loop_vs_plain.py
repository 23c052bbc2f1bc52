"""Our training loop vs the plain loop of the PyTorch "Training a classifier" tutorial.

Same model (the cifar10-convnet ConvNet), same synthetic data, batch size and
AdamW optimizer, one CPU process. Both loops are timed by the same clock over
the same span: from the first batch entering the model (a forward pre-hook:
the first batch has been fetched) to the last optimizer step done (a step
post-hook); data loading inside the span counts for both. Runs alternate
(plain, ours, plain, ...) so machine noise hits both alike; prints each run,
the medians and ours/plain, per thread count. Then one more run of ours with
every per-step piece of the loop timed: where our overhead goes.

    python benchmarks/loop_vs_plain.py [--steps 150] [--repeats 5] [--threads 1,2]
    python benchmarks/loop_vs_plain.py --device cuda --precision bf16 --on-device   # (benchmarks/gpu_suite.sh)

On a GPU the plain loop is the tutorial's too: batches from the DataLoader,
moved with `.to(device)`, under `torch.autocast` for bf16. Ours with
`--on-device` keeps the dataset on the GPU (`training.data.onDevice`). The span
is then timed with CUDA events recorded by the same hooks.

Our loop is configured like the tutorial's (no clipping, constant LR, no
warmup, metrics off: benchmarks/metrics_overhead.py measures those) so the
ratio measures the loop's own overhead: DistributedSampler, autocast/GradScaler
plumbing, accumulation bookkeeping, the watchdog, preemption checks, progress
logging. Goal: ours/plain >= 0.97 at 1 and 2 threads.

Both loops run with glibc's malloc set as our worker sets it at start
(trainer/worker/host_memory.py). With glibc's defaults, how many pages each step
faults in again depends on the process's allocation history, and the same code
measured 0.83 one run and 0.99 the next; `--glibc-defaults` shows that, and
benchmarks/host_memory.py measures what the setting itself is worth.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import resource
import statistics
import time
import typing
from unittest import mock

import torch
from torch import nn

from trainer.config import trainer_config_from_values
from trainer.tasks import get_task
from trainer.values import resolve_values
from trainer.worker.distributed import resolve_rank
from trainer.worker.host_memory import keep_freed_memory
from trainer.worker.loop import Trainer
from trainer.worker.metrics import MetricsProcessor
from trainer.worker.preemption import PreemptionWatch
from trainer.worker.watchdog import HangWatchdog

GOAL = 0.97
CPU = torch.device("cpu")


def config(steps: int, batch: int, precision: str = "fp32", on_device: bool = False):
    values = resolve_values(set_values=[
        f"training.maxSteps={steps},training.batchSize={batch},training.epochs=1000",
        "training.gradClipNorm=0,training.lrSchedule.name=constant,training.lrSchedule.warmupSteps=0",
        "training.data.trainSamples=8192,training.data.evalSamples=1,training.logEverySteps=50",
        f"training.optimizer.weightDecay=0,training.precision={precision},training.data.onDevice={str(on_device).lower()}",
    ])
    return trainer_config_from_values("bench", values)


class Span(typing.NamedTuple):
    samples_per_second: float
    faults_per_step: float  # minor page faults: pages the kernel mapped in (zero-filled) inside the span


class SpanClock:
    """First batch into the model to last optimizer step done, by hooks: the same clock for both loops."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device = CPU):
        self.cuda = device.type == "cuda"
        self.first = self.last = None
        self.faults = [0, 0]  # minor page faults at the span's start and end
        self.steps = 0
        self.hooks = [model.register_forward_pre_hook(self._forward), optimizer.register_step_post_hook(self._step)]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)  # the GPU's timeline, not the launch
        event.record()
        return event

    def _forward(self, module, args) -> None:
        if self.first is None:
            self.faults[0] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.first = self._now()

    def _step(self, optimizer, args, kwargs) -> None:
        self.last = self._now()
        self.faults[1] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.steps += 1

    def span(self, batch: int) -> Span:
        rate = self.samples_per_second(batch)
        return Span(rate, (self.faults[1] - self.faults[0]) / max(self.steps, 1))

    def samples_per_second(self, batch: int) -> float:
        for hook in self.hooks:
            hook.remove()
        if self.cuda:
            torch.cuda.synchronize()
            return self.steps * batch / (self.first.elapsed_time(self.last) / 1000)
        return self.steps * batch / (self.last - self.first)


def plain_loop(cfg, steps: int, device: torch.device = CPU) -> Span:
    """The tutorial's loop, verbatim in spirit."""
    t = cfg.training
    torch.manual_seed(t.seed)
    spec = get_task(t.task)(t)
    net, criterion = spec.model.to(device), nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.optimizer.lr, weight_decay=0)
    loader = torch.utils.data.DataLoader(spec.train_dataset, batch_size=t.batch_size, shuffle=True,
                                         drop_last=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    clock = SpanClock(net, optimizer, device)
    done, running_loss = 0, 0.0
    while done < steps:
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            with autocast:
                outputs = net(inputs)
                loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += 1
            if done == steps:
                break
    return clock.span(t.batch_size)


def our_loop(cfg, device: torch.device = CPU) -> tuple[Span, dict]:
    """Our Trainer's samples/s by the same clock, and its summary."""
    trainer = Trainer(cfg, resolve_rank({}), device)
    clock = SpanClock(trainer.raw_model, trainer.optimizer, device)
    summary = trainer.fit()
    return clock.span(cfg.training.batch_size), summary


# Per-step pieces of our loop, timed by wrapping them (outside the measured repeats).
PIECES = {
    "forward+backward+optimizer (train_step)": (Trainer, "train_step"),
    "epoch-boundary evaluation": (Trainer, "evaluate"),
    "watchdog beats": (HangWatchdog, "beat"),
    "preemption check": (PreemptionWatch, "should_stop"),
    "metrics (observe_step, off)": (MetricsProcessor, "observe_step"),
}


@contextlib.contextmanager
def timing(pieces: dict):
    spent = collections.Counter()

    def wrap(name, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return timed

    with contextlib.ExitStack() as stack:
        for name, (owner, attr) in pieces.items():
            stack.enter_context(mock.patch.object(owner, attr, wrap(name, getattr(owner, attr))))
        yield spent


def breakdown(cfg, plain_rate: float) -> None:
    steps, batch = cfg.training.max_steps, cfg.training.batch_size
    with timing(PIECES) as spent:
        start = time.perf_counter()
        trainer = Trainer(cfg, resolve_rank({}), torch.device("cpu"))
        clock = SpanClock(trainer.raw_model, trainer.optimizer)
        trainer.fit()
        whole = time.perf_counter() - start
    span = clock.last - clock.first
    print(f"\nwhere our time goes, per step (one more run of {steps} steps; the plain loop's whole step: "
          f"{1000 * batch / plain_rate:.2f} ms)")
    print(f"  {'measured span / step':<42} {1000 * span / steps:8.3f} ms")
    accounted = 0.0
    for name, seconds in spent.most_common():
        accounted += seconds
        print(f"  {name:<42} {1000 * seconds / steps:8.3f} ms")
    print(f"  {'rest: data loading, loop bookkeeping':<42} {1000 * (span - accounted) / steps:8.3f} ms")
    print(f"  {'outside the span: build, resume, close':<42} {1000 * (whole - span):8.1f} ms once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--on-device", action="store_true", help="ours with training.data.onDevice (GPU)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc as it starts, not as our worker sets it (for both loops)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("host memory: glibc defaults" if args.glibc_defaults else keep_freed_memory())
    device = torch.device(args.device)
    cfg = config(args.steps, args.batch, args.precision, args.on_device)
    print(f"device {device}, precision {args.precision}, ours with onDevice {args.on_device}")
    table = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        plain, ours, reported = [], [], []
        plain_loop(cfg, 10, device)  # warm up allocator and kernels once for both
        print(f"\n{threads} thread(s):")
        for i in range(args.repeats):
            for side in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):  # alternate who goes first
                if side == "plain":
                    plain.append(plain_loop(cfg, args.steps, device))
                else:
                    span, summary = our_loop(cfg, device)
                    ours.append(span)
                    reported.append(summary["samples_per_second"])
            print(f"  repeat {i + 1}: plain {plain[-1].samples_per_second:8.1f} samples/s "
                  f"({plain[-1].faults_per_step:.0f} page faults/step)   ours {ours[-1].samples_per_second:8.1f} "
                  f"samples/s ({ours[-1].faults_per_step:.0f}; self-reported {reported[-1]:.1f})", flush=True)
        p = statistics.median(span.samples_per_second for span in plain)
        o = statistics.median(span.samples_per_second for span in ours)
        table.append((threads, p, o))
        if threads == 1 and device.type == "cpu":
            breakdown(cfg, p)
    print(f"\n{'threads':>7} {'plain samples/s':>16} {'ours samples/s':>15} {'ours/plain':>11} {'goal':>6}")
    for threads, p, o in table:
        print(f"{threads:>7} {p:>16.1f} {o:>15.1f} {o / p:>11.3f} {'met' if o / p >= GOAL else 'MISSED':>6}")
    print(f"(medians of {args.repeats} alternating repeats x {args.steps} steps, batch {args.batch})")


if __name__ == "__main__":
    main()
