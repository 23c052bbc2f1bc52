"""Training throughput per task on CPU: 1, 2 and 4 gloo processes against ideal scaling, as a table.

    python benchmarks/tasks_throughput.py [--steps 30] [--procs 1,2,4] [--tasks speech-conv1d,custom]

Each cell runs `kubetrain run` for real (one process per replica, gloo, the
task's synthetic data, small sizes that fit a laptop) and reads rank 0's
progress lines: the samples/s of every logged window after the first (the
first holds warm-up), summed over ranks (the loop logs global samples/s). The
table shows the median window per process count and its efficiency: samples/s
over N times the 1-process samples/s (1.00 = linear scaling; on a machine with
fewer free cores than processes it is lower, by at least cores/N).
OMP_NUM_THREADS=1 per process so the two configurations get comparable cores.
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


def run(name: str, training: dict, nodes: int, steps: int, tmp: Path) -> float | None:
    values = {"job": {"nodes": nodes, "nprocPerNode": 1}, "metrics": {"enabled": False},
              "training": {**COMMON, **training, "maxSteps": steps,
                           "data": {**COMMON["data"], **training.get("data", {})}}}
    path = tmp / f"values-{abs(hash((name, nodes)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.controller.cli", "run", "bench", "-f", str(path),
         "--workdir", str(tmp / f"run-{abs(hash((name, nodes)))}")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    if proc.returncode != 0:
        print(f"{name} x{nodes} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    rates = [float(m) for m in re.findall(r"samples/s (\d+(?:\.\d+)?)", proc.stdout)]
    if len(rates) < 2:
        return json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_second"]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--tasks", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--procs", default="1,2,4", help="comma-separated process counts; the first is the base")
    args = parser.parse_args()
    procs = [int(n) for n in args.procs.split(",")]
    with tempfile.TemporaryDirectory(prefix="kubetrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        loads = workloads(tmp)
        chosen = [t for t in loads if not args.tasks or t.split(" ")[0] in args.tasks.split(",")]
        rows = []
        for name in chosen:
            rates = [run(name, loads[name], nodes, args.steps, tmp) for nodes in procs]
            rows.append((name, loads[name]["batchSize"], rates))
            print(f"  done: {name}", file=sys.stderr, flush=True)
    fmt = lambda v: "failed" if v is None else f"{v:,.0f}"  # noqa: E731
    print(f"\nCPU training throughput, median samples/s over logged windows ({args.steps} steps, "
          f"OMP_NUM_THREADS=1, {os.cpu_count()} CPUs)\n")
    head = "".join(f" {f'{n}p samples/s':>13} | eff. |" for n in procs)
    print(f"| {'task':32} | batch/proc |{head}")
    print(f"|{'-' * 34}|-----------:|" + "--------------:|-----:|" * len(procs))
    for name, batch, rates in rows:
        base = rates[0] / procs[0] if rates[0] else None
        cells = "".join(f" {fmt(r):>13} | {(f'{r / (n * base):.2f}' if r and base else '-'):>4} |"
                        for n, r in zip(procs, rates))
        print(f"| {name:32} | {batch:>10} |{cells}")


if __name__ == "__main__":
    main()
