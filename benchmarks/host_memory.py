"""What keeping freed host memory in the process is worth (trainer/worker/host_memory.py).

Every run is a fresh process, because glibc's malloc state is the process's own: the
tutorial's plain loop and our Trainer (benchmarks/loop_vs_plain.py), each once with glibc's
defaults and once with the thresholds our worker sets, in alternating order. Prints samples/s,
minor page faults per step and peak RSS, with medians and the kept/default ratio per loop and
batch size.

    python benchmarks/host_memory.py [--repeats 5] [--steps 100] [--batches 64,256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

MODES = ("default", "kept")
LOOPS = ("plain", "ours")


def child(loop: str, mode: str, steps: int, batch: int, threads: int) -> None:
    import logging

    import torch

    from loop_vs_plain import config, our_loop, plain_loop
    from trainer.worker.host_memory import keep_freed_memory

    if mode == "kept":
        keep_freed_memory()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    plain_loop(config(10, batch), 10)  # warm-up, as loop_vs_plain does
    cfg = config(steps, batch)
    span = plain_loop(cfg, steps) if loop == "plain" else our_loop(cfg)[0]
    print(json.dumps({"samples_per_second": span.samples_per_second, "faults_per_step": span.faults_per_step,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(loop: str, mode: str, args, batch: int) -> dict:
    command = [sys.executable, str(Path(__file__)), "--child", loop, mode, "--steps", str(args.steps),
               "--batches", str(batch), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--child", nargs=2, metavar=("LOOP", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.steps, int(args.batches), args.threads)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"\nbatch {batch}, {args.threads} thread(s):")
        runs = {(loop, mode): [] for loop in LOOPS for mode in MODES}
        for i in range(args.repeats):
            order = [(loop, mode) for loop in LOOPS for mode in MODES]
            for key in order if i % 2 == 0 else reversed(order):
                runs[key].append(measure(*key, args, batch))
                r = runs[key][-1]
                print(f"  repeat {i + 1} {key[0]:>5} {key[1]:>7}: {r['samples_per_second']:8.1f} samples/s "
                      f"{r['faults_per_step']:7.0f} faults/step {r['max_rss_mb']:6.0f} MB", flush=True)
        for loop in LOOPS:
            med = {mode: {k: statistics.median(r[k] for r in runs[(loop, mode)]) for k in runs[(loop, mode)][0]}
                   for mode in MODES}
            rows.append((batch, loop, med))
    print(f"\n{'batch':>5} {'loop':>5} {'default samples/s':>18} {'kept samples/s':>15} {'kept/default':>13} "
          f"{'faults/step default -> kept':>28} {'peak RSS MB default -> kept':>28}")
    for batch, loop, med in rows:
        d, k = med["default"], med["kept"]
        print(f"{batch:>5} {loop:>5} {d['samples_per_second']:>18.1f} {k['samples_per_second']:>15.1f} "
              f"{k['samples_per_second'] / d['samples_per_second']:>13.3f} "
              f"{d['faults_per_step']:>15.0f} -> {k['faults_per_step']:<9.0f} "
              f"{d['max_rss_mb']:>15.0f} -> {k['max_rss_mb']:<9.0f}")
    print(f"(medians of {args.repeats} alternating repeats, each a fresh process, {args.steps} steps)")


if __name__ == "__main__":
    main()
