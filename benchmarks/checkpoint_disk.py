"""Checkpoint save and load to local disk (file://): our manager against a raw torch.save/torch.load.

A model of `--mb` megabytes of fp32 weights on `--device` (cuda: the copy to
host memory is part of the save, as in training). Alternating repeats, medians:

1. Sync save: our CheckpointManager (files, SHA-256, commit marker, retention)
   vs `torch.save(state_dict)` of the same tensors into a new file per step followed
   by `os.fsync` (durable, as ours is: a checkpoint must survive the node), in GB/s.
   The baseline deletes its previous file outside the timed span; ours deletes old
   steps beside training, and the next save waits for that.
2. Load: our `resume` (verification included) vs `torch.load(weights_only=True)`.
3. Stall: how long the training thread is blocked per save, sync vs
   `checkpoint.asyncSave` (saves spaced 1.5x the sync save time apart).

    python benchmarks/checkpoint_disk.py [--mb 1000] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage_throughput import ModelOnly, manager_for, timed  # noqa: E402

MB = 1_000_000


def durable_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


class Reloadable(ModelOnly):
    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.state.step = state["train_state"]["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    size = args.mb * MB
    trainer = Reloadable(size, args.device)
    with tempfile.TemporaryDirectory(prefix="kubetrain-ckpt-bench-") as tmp:
        ours = manager_for(None, "", uri=Path(tmp, "ours").as_uri())
        raw_file = Path(tmp, "raw-0.pt")
        save = {"ours": [], "raw": []}
        load = {"ours": [], "raw": []}
        for i in range(args.repeats):
            for side in (("ours", "raw") if i % 2 == 0 else ("raw", "ours")):
                trainer.state.step += 1
                if side == "ours":
                    save["ours"].append(timed(lambda: ours.save(trainer)))
                else:  # a new file per step, as a plain loop writes ckpt_<step>.pt
                    previous, raw_file = raw_file, Path(tmp, f"raw-{trainer.state.step}.pt")
                    save["raw"].append(timed(lambda: durable_save(trainer.state_dict(), raw_file)))
                    previous.unlink(missing_ok=True)
            for side in (("ours", "raw") if i % 2 == 0 else ("raw", "ours")):
                if side == "ours":
                    fresh = manager_for(None, "", uri=Path(tmp, "ours").as_uri())
                    load["ours"].append(timed(lambda: fresh.resume(trainer)))
                else:
                    load["raw"].append(timed(lambda: trainer.load_state_dict(
                        torch.load(raw_file, map_location=args.device, weights_only=True))))
        ours.close()
        print(f"checkpoint of {args.mb} MB on {args.device} to local disk, medians of {args.repeats} alternating")
        print(f"{'op':>6} {'ours GB/s':>10} {'torch.save+fsync/load GB/s':>27} {'ours/raw':>9}")
        for op, times in (("save", save), ("load", load)):
            rate = {side: size / 1e9 / statistics.median(t) for side, t in times.items()}
            print(f"{op:>6} {rate['ours']:>10.2f} {rate['raw']:>27.2f} {rate['ours'] / rate['raw']:>9.2f}")

        stalls, gap = {}, 1.5 * statistics.median(save["ours"])
        for mode in ("sync", "async"):
            manager = manager_for(None, "", async_save=mode == "async", uri=Path(tmp, mode).as_uri())
            times = []
            for _ in range(args.repeats):
                trainer.state.step += 1
                times.append(timed(lambda: manager.save(trainer)))
                time.sleep(gap)  # "training" between saves, longer than one save
                trainer.train_a_little()
            manager.close()
            stalls[mode] = statistics.median(times)
        print(f"stall per save: sync {stalls['sync'] * 1000:.0f} ms, async {stalls['async'] * 1000:.0f} ms "
              f"(sync/async {stalls['sync'] / stalls['async']:.1f}x)")


if __name__ == "__main__":
    main()
