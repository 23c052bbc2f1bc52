"""Resume time against the data position: a resume at 90% of an epoch against one at 10%.

    python benchmarks/resume_position.py [--repeats 5] [--samples 25600] [--workers 0] [--tree DIR]

One run of the synthetic CIFAR-10 ConvNet (items made per index, trainer/tasks/_synthetic.py, so
every item the loader reads costs real work) commits checkpoints at 10% and 90% of its first
epoch. Then each repeat resumes from both, in alternating order, in a fresh process that trains
one step: the trainer's start-up line (trainer/worker/startup.py) says how long loading the
checkpoint ("resume") and reaching the first resumed step ("first step": the loader's first batch
and one step) took. Prints their medians per position and the ratio 90% / 10%: 1.0 when resume
time does not grow with the position in the epoch (the goal: <= 1.2). `--tree` times another
checkout of kubetrain (e.g. the commit before the change) with the same script.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH = 32
STARTUP = re.compile(r"start-up: .*resume ([0-9.]+)s, first step ([0-9.]+)s; ([0-9.]+)s from process start")


def kubetrain_run(tree: Path, work: Path, *sets: str) -> str:
    args = [sys.executable, "-m", "trainer.controller.cli", "run", "bench", "--workdir", str(work / "run")]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=tree, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"kubetrain run failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=25600, help="training set size (an epoch is samples/32 steps)")
    parser.add_argument("--workers", type=int, default=0, help="training.data.numWorkers")
    parser.add_argument("--tree", type=Path, default=REPO, help="the kubetrain source tree to time")
    args = parser.parse_args()
    epoch = args.samples // BATCH
    early, late = epoch // 10, epoch // 10 * 9
    with tempfile.TemporaryDirectory(prefix="kubetrain-resume-") as tmp:
        work = Path(tmp)
        store, kept = work / "store", work / "kept"
        common = ["job.nodes=1,metrics.enabled=false,training.tensorboard.enabled=false,training.task=cifar10-convnet",
                  f"training.data.trainSamples={args.samples},training.data.evalSamples=32,training.batchSize={BATCH}",
                  f"training.data.numWorkers={args.workers},checkpoint.uri={store.as_uri()},checkpoint.keepLast=10"]
        print(f"training to step {late} of a {epoch}-step epoch, checkpoints every {early} ...", flush=True)
        kubetrain_run(args.tree, work, *common, f"training.maxSteps={late},checkpoint.everySteps={early}")
        store.rename(kept)
        seconds: dict[int, list[float]] = {early: [], late: []}
        total: dict[int, list[float]] = {early: [], late: []}
        for repeat in range(args.repeats):
            for position in (early, late) if repeat % 2 == 0 else (late, early):
                shutil.rmtree(store, ignore_errors=True)  # only the step resumed from
                step = f"bench/step-{position:08d}"
                shutil.copytree(kept / step, store / step)
                out = kubetrain_run(args.tree, work, *common,
                                    f"training.maxSteps={position + 1},checkpoint.resume={position}")
                match = STARTUP.search(out)
                if match is None or f"step-{position:08d}" not in out:
                    sys.exit(f"no start-up line or no resume from step {position}:\n{out[-3000:]}")
                seconds[position].append(float(match.group(1)) + float(match.group(2)))
                total[position].append(float(match.group(3)))
                print(f"  resume at step {position}: {seconds[position][-1]:.2f}s checkpoint to first step, "
                      f"{total[position][-1]:.2f}s from process start", flush=True)
    print(f"\n{args.samples} items, {epoch} steps an epoch, numWorkers {args.workers}, tree {args.tree.name}, "
          f"medians of {args.repeats} alternating")
    for position, label in ((early, "10%"), (late, "90%")):
        print(f"  {label} (step {position}): {statistics.median(seconds[position]):.2f}s checkpoint to first step, "
              f"{statistics.median(total[position]):.2f}s from process start")
    ratio = statistics.median(seconds[late]) / statistics.median(seconds[early])
    print(f"  ratio 90% / 10%: {ratio:.2f} (checkpoint to first step; goal <= 1.2), "
          f"{statistics.median(total[late]) / statistics.median(total[early]):.2f} from process start")


if __name__ == "__main__":
    main()
