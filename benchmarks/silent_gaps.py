"""Time to first step and the longest silence per task: what a user watching `kubetrain run` waits for.

    python benchmarks/silent_gaps.py [--steps 20] [--tasks speech-conv1d,resnet18-finetune]

Each task runs once with `kubetrain run` (one process, synthetic data at the
default sizes, its default model options, tiny offline models for the
Hugging Face tasks, `--steps` optimizer steps, a local checkpoint.uri so the
final checkpoint and the export are part of it). Every output line (stdout and
stderr) is timestamped as it arrives. Per task it prints:
  first step   seconds from launching the CLI to rank 0's `start-up:` line
               (the loop logs it when the first step is done)
  longest gap  the longest time between two consecutive output lines (the
               process exit counts as a last line), and the line it followed:
               the phase that ran without a word
The goal is no gap above 5 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def workloads(tmp: Path) -> dict[str, dict]:
    """name -> training values; everything else is the default a user gets."""
    loads = {
        "cifar10-convnet": {"task": "cifar10-convnet"},
        "resnet18-finetune": {"task": "resnet18-finetune", "numClasses": 4},
        "speech-conv1d": {"task": "speech-conv1d", "numClasses": 4},
        "custom": {"task": "custom", "entrypoint": "tabular_mlp.task:build", "numClasses": 3,
                   "pythonPath": [str(REPO / "examples" / "custom_model")]},
    }
    try:
        from trainer.tasks.bert_sentiment import save_tiny_model as tiny_bert
        from trainer.tasks.causal_lm import save_tiny_model as tiny_llm

        loads["bert-sentiment"] = {"task": "bert-sentiment", "numClasses": 2,
                                   "pretrained": tiny_bert(tmp / "tiny-bert").as_uri()}
        loads["causal-lm"] = {"task": "causal-lm", "pretrained": tiny_llm(tmp / "tiny-llm").as_uri(),
                              "batchSize": 8}
    except ImportError:
        print("bert-sentiment and causal-lm skipped: transformers is not installed")
    return loads


def run(name: str, training: dict, steps: int, tmp: Path) -> dict:
    slug = name.replace(" ", "-")
    values = {"job": {"nodes": 1, "nprocPerNode": 1}, "metrics": {"enabled": False},
              "checkpoint": {"uri": (tmp / f"checkpoints-{slug}").as_uri()},  # a checkpoint and the export
              "training": {**training, "maxSteps": steps}}
    path = tmp / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(values))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.controller.cli", "run", "gaps", "-f", str(path),
         "--workdir", str(tmp / f"run-{slug}")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=dict(os.environ))
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    ended = time.perf_counter() - started
    first_step = next((t for t, text in lines if "start-up:" in text), None)
    gap, after, previous, previous_text = 0.0, "(launch)", 0.0, "(launch)"
    for t, text in [*lines, (ended, "(exit)")]:
        if t - previous > gap:
            gap, after = t - previous, previous_text
        previous, previous_text = t, text
    return {"name": name, "code": code, "first_step": first_step, "gap": gap, "after": after,
            "wall": ended, "lines": len(lines), "tail": [text for _, text in lines[-5:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tasks", default="", help="comma-separated names (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kubetrain-gaps-") as tmp:
        loads = workloads(Path(tmp))
        chosen = [t for t in args.tasks.split(",") if t] or list(loads)
        print(f"{'task':<19} {'first step':>10} {'longest gap':>11} {'wall':>6} {'lines':>5}  gap after")
        for name in chosen:
            r = run(name, loads[name], args.steps, Path(tmp))
            first = f"{r['first_step']:.1f}s" if r["first_step"] is not None else "n/a"
            after = r["after"] if len(r["after"]) <= 110 else r["after"][:107] + "..."
            print(f"{name:<19} {first:>10} {r['gap']:>10.1f}s {r['wall']:>5.0f}s {r['lines']:>5}  {after}",
                  flush=True)
            if r["code"] != 0:
                print(f"  exit {r['code']}; last lines:\n    " + "\n    ".join(r["tail"]), flush=True)


if __name__ == "__main__":
    main()
