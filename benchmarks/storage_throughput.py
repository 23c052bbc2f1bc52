"""Checkpoint storage throughput: our storage layer vs raw boto3, and the async-save stall.

Starts a real S3-compatible server process (moto) on loopback and, for each
size, uploads and downloads the same random bytes through
`trainer.worker.storage.S3Store` and through a plain boto3 client with its
default TransferConfig, alternating, several times. Prints median MB/s and the
ratio ours/raw. Then saves a checkpoint of a model of that size through
CheckpointManager synchronously and with `checkpoint.asyncSave`, and prints how
long each save blocks the training thread (the stall).

    python benchmarks/storage_throughput.py [--large] [--repeats N]

`--large` adds 1 GB (needs ~4 GB of free memory).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MB = 1_000_000


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput(server, sizes: list[int], repeats: int) -> None:
    from trainer.config import S3Config
    from trainer.worker.storage import open_store

    ours = open_store("s3://bench/ours", S3Config(server.endpoint, "us-east-1", "path", ""))
    raw = server.client()
    print(f"{'size':>8} {'op':>8} {'ours MB/s':>10} {'boto3 MB/s':>11} {'ratio':>6}")
    for size in sizes:
        data = os.urandom(size)
        results = {"upload": ([], []), "download": ([], [])}
        for _ in range(repeats):
            results["upload"][0].append(timed(lambda: ours.write_bytes("blob", data)))
            results["upload"][1].append(timed(lambda: raw.upload_fileobj(io.BytesIO(data), "bench", "raw/blob")))
            results["download"][0].append(timed(lambda: ours.read_bytes("blob")))
            results["download"][1].append(timed(lambda: raw.download_fileobj("bench", "raw/blob", io.BytesIO())))
        for op, (mine, theirs) in results.items():
            a, b = size / MB / statistics.median(mine), size / MB / statistics.median(theirs)
            print(f"{size // MB:>6}MB {op:>8} {a:>10.1f} {b:>11.1f} {a / b:>6.2f}", flush=True)
        del data


def async_stall(server, size: int, repeats: int) -> None:
    import torch

    from trainer.chart import default_values
    from trainer.config import trainer_config_from_values
    from trainer.values import merge, validate
    from trainer.worker.checkpoint import CheckpointManager
    from trainer.worker.distributed import RankInfo

    info = RankInfo("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)
    model = torch.nn.Linear(size // 4 // 1000, 1000, bias=False)  # `size` bytes of fp32 weights

    class ModelOnly:  # the Trainer's checkpoint interface, with only a model to save
        state = SimpleNamespace(step=0)

        def state_dict(self):
            return {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {},
                    "train_state": {"step": self.state.step}, "rng": {}}

    trainer = ModelOnly()
    print(f"\ncheckpoint of {size // MB} MB: time the training thread is blocked per save (median of {repeats}; "
          "async saves 1.5x the sync save time apart)")
    stalls, gap = {}, 0.2
    for mode in ("sync", "async"):
        values = merge(default_values(), {"checkpoint": {"uri": f"s3://bench/{mode}", "asyncSave": mode == "async",
                                                         "keepLast": 2}, "s3": {"endpoint": server.endpoint}})
        manager = CheckpointManager(trainer_config_from_values("bench", validate(values)), info)
        times = []
        for _ in range(repeats):
            trainer.state.step += 1
            times.append(timed(lambda: manager.save(trainer)))
            time.sleep(gap)  # "training" between saves, longer than one upload
            with torch.no_grad():
                model.weight.add_(1.0)  # training mutates the weights while the upload may still run
        total = timed(manager.close)
        stalls[mode] = statistics.median(times)
        gap = 1.5 * stalls["sync"]
        print(f"  {mode:>5}: stall {stalls[mode] * 1000:8.1f} ms   (final wait {total * 1000:.0f} ms)", flush=True)
    print(f"  async removes {100 * (1 - stalls['async'] / stalls['sync']):.0f}% of the stall "
          f"(ratio sync/async {stalls['sync'] / stalls['async']:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", action="store_true", help="also 1 GB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tests.s3server import CREDENTIALS, S3Server

    os.environ.update(CREDENTIALS)
    server = S3Server().start()
    try:
        server.create_bucket("bench")
        sizes = [10 * MB, 100 * MB] + ([1000 * MB] if args.large else [])
        throughput(server, sizes, args.repeats)
        async_stall(server, 100 * MB, args.repeats)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
