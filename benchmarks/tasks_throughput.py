"""Training throughput per task on CPU: 1, 2 and 4 gloo processes against ideal scaling, and where the loss goes.

    python benchmarks/tasks_throughput.py [--steps 60] [--procs 1,2,4] [--repeats 5] [--tasks speech-conv1d,custom]

Each cell runs `kubetrain run` for real (one process per replica, gloo, the
task's synthetic data, small sizes that fit a laptop) and reads rank 0's
progress lines: the samples/s of every logged window after the first (the
first holds warm-up); the loop logs global samples/s. A run's figure is its
median window; a cell is the median over `--repeats` rounds, and each round
runs the process counts in alternating order (1,2,4 then 4,2,1).

Where the loss goes: beside each N-process DDP job, the same round starts N
independent 1-process jobs at once (no process group, no all-reduce) and sums
their samples/s. With ideal = N x the 1-process rate:
  contention = ideal - independent     (CPU, memory bandwidth: N processes on
                                        the machine's cores, nothing shared)
  sync       = independent - DDP       (gradient all-reduce, and waiting for
                                        the slowest rank at every step)
Both are shown as shares of ideal. OMP_NUM_THREADS=1 per process, so a machine
with C free cores cannot pass an efficiency of C/N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

COMMON = {"epochs": 100, "logEverySteps": 3, "lrSchedule": {"warmupSteps": 2},
          "data": {"trainSamples": 4096, "evalSamples": 64}}
SPEECH = {"sampleRate": 8000, "seconds": 0.5, "channels": 32, "blocks": 4}


def workloads(tmp: Path) -> dict[str, dict]:
    """name -> training values (per-process batch size, task options)."""
    loads = {
        "cifar10-convnet": {"task": "cifar10-convnet", "batchSize": 64},
        "resnet18-finetune": {"task": "resnet18-finetune", "batchSize": 16, "numClasses": 4,
                              "options": {"imageSize": 32}},
        "speech-conv1d": {"task": "speech-conv1d", "batchSize": 32, "numClasses": 4, "options": SPEECH,
                          "data": {"trainSamples": 1536, "evalSamples": 64}},
        "speech-conv1d (fsdp)": {"task": "speech-conv1d", "parallelism": "fsdp", "batchSize": 32,
                                 "numClasses": 4, "options": SPEECH,
                                 "data": {"trainSamples": 1536, "evalSamples": 64}},
        "custom (examples/custom_model)": {
            "task": "custom", "entrypoint": "tabular_mlp.task:build", "batchSize": 256, "numClasses": 3,
            "pythonPath": [str(REPO / "examples" / "custom_model")]},
    }
    try:
        from trainer.tasks.bert_sentiment import save_tiny_model

        folder = save_tiny_model(tmp / "tiny-bert")
        loads["bert-sentiment (tiny)"] = {"task": "bert-sentiment", "batchSize": 32, "numClasses": 2,
                                          "pretrained": folder.as_uri()}
    except ImportError:
        print("bert-sentiment skipped: transformers is not installed (pip install 'kubetrain[nlp]')")
    return loads


def start(name: str, training: dict, nodes: int, steps: int, tmp: Path, tag: str) -> subprocess.Popen:
    values = {"job": {"nodes": nodes, "nprocPerNode": 1}, "metrics": {"enabled": False},
              "training": {**COMMON, **training, "maxSteps": steps,
                           "data": {**COMMON["data"], **training.get("data", {})}}}
    path = tmp / f"values-{abs(hash((name, nodes, tag)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", "run", "bench", "-f", str(path),
         "--workdir", str(tmp / f"run-{abs(hash((name, nodes, tag)))}")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)


def rate_of(proc: subprocess.Popen, what: str) -> float | None:
    """The run's median logged samples/s after the first window (or its summary's, if it logged one)."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        print(f"{what} failed:\n{stdout[-1500:]}{stderr[-1500:]}", file=sys.stderr)
        return None
    rates = [float(m) for m in re.findall(r"samples/s (\d+(?:\.\d+)?)", stdout)]
    if len(rates) < 2:
        return json.loads(stdout.strip().splitlines()[-1])["samples_per_second"]
    return statistics.median(rates[1:])


def ddp_job(name: str, training: dict, nodes: int, steps: int, tmp: Path) -> float | None:
    return rate_of(start(name, training, nodes, steps, tmp, "ddp"), f"{name} x{nodes}")


def independent_jobs(name: str, training: dict, count: int, steps: int, tmp: Path) -> float | None:
    """`count` 1-process jobs started together: the machine as loaded as by the DDP job, with no sync."""
    procs = [start(name, training, 1, steps, tmp, f"alone-{i}") for i in range(count)]
    rates = [rate_of(p, f"{name} alone #{i}") for i, p in enumerate(procs)]
    return None if None in rates else sum(rates)


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--tasks", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--procs", default="1,2,4", help="comma-separated process counts; the first is the base")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each cell is the median over them")
    args = parser.parse_args()
    procs = [int(n) for n in args.procs.split(",")]
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        loads = workloads(tmp)
        chosen = [t for t in loads if not args.tasks or t.split(" ")[0] in args.tasks.split(",")]
        rows = []
        for name in chosen:
            ddp = {n: [] for n in procs}
            alone = {n: [] for n in procs[1:]}
            for round_ in range(args.repeats):
                for n in (procs if round_ % 2 == 0 else procs[::-1]):
                    ddp[n].append(ddp_job(name, loads[name], n, args.steps, tmp))
                    if n in alone:
                        alone[n].append(independent_jobs(name, loads[name], n, args.steps, tmp))
            rows.append((name, loads[name]["batchSize"], {n: median(v) for n, v in ddp.items()},
                         {n: median(v) for n, v in alone.items()}))
            print(f"  done: {name}", file=sys.stderr, flush=True)
    fmt = lambda v: "failed" if v is None else f"{v:,.0f}"  # noqa: E731
    print(f"\nCPU training throughput, samples/s: median over {args.repeats} alternating rounds of each run's "
          f"median logged window ({args.steps} steps, OMP_NUM_THREADS=1, {os.cpu_count()} CPUs)\n")
    print("| task | batch/proc | procs | DDP samples/s | efficiency | independent samples/s | "
          "lost to contention | lost to sync |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, rates, independent in rows:
        base = rates[procs[0]] / procs[0] if rates[procs[0]] else None
        for n in procs:
            ideal = n * base if base else None
            eff = f"{rates[n] / ideal:.2f}" if rates[n] and ideal else "-"
            if n in independent and independent[n] and ideal and rates[n]:
                alone, contention, sync = (fmt(independent[n]), f"{(ideal - independent[n]) / ideal:.0%}",
                                           f"{(independent[n] - rates[n]) / ideal:.0%}")
            else:
                alone = contention = sync = "-"
            print(f"| {name} | {batch} | {n} | {fmt(rates[n])} | {eff} | {alone} | {contention} | {sync} |")


if __name__ == "__main__":
    main()
