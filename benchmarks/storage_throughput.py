"""Checkpoint storage throughput: our store vs raw S3 clients, the checksum's cost, the async-save stall.

Starts real S3-compatible server processes on loopback — SeaweedFS (what the
dev stack deploys) and moto — and against each, side by side:

1. Throughput. For each size, uploads and downloads the same random bytes
   through `trainer.storage.S3Store`, through plain boto3 with its
   default TransferConfig, and through `s3torchconnector` (the AWS CRT-based
   PyTorch connector, if installed: `pip install -e '.[bench]'`), alternating
   clients each repeat (objects under 100 MB get more repeats: they are noisier).
   Prints median MB/s and ours / the fastest raw client.
2. Checksum cost. Saves a checkpoint through CheckpointManager with its
   SHA-256 on and with it stubbed out, alternating; prints the medians and the
   share of the save time the checksum costs.
3. Async stall. How long a save blocks the training thread, sync vs
   `checkpoint.asyncSave`.

    python benchmarks/storage_throughput.py [--server seaweedfs|moto|both] [--large] [--repeats N]

`--large` adds 1 GB objects (needs ~4 GB of free memory). SeaweedFS needs
$KUBETRAIN_WEED (scripts/install-test-tools.sh builds it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MB = 1_000_000


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def connector_clients(server):
    """s3torchconnector's upload and download, or None with the reason it cannot run."""
    try:
        from s3torchconnector import S3Checkpoint
        from s3torchconnector._s3client import S3ClientConfig
    except ImportError as e:
        return None, f"s3torchconnector not installed ({e.name})"
    checkpoint = S3Checkpoint("us-east-1", endpoint=server.endpoint,
                              s3client_config=S3ClientConfig(force_path_style=True))

    def upload(data: bytes) -> None:
        with checkpoint.writer("s3://bench/crt/blob") as writer:
            writer.write(data)

    def download() -> None:
        with checkpoint.reader("s3://bench/crt/blob") as reader:
            reader.read()

    try:
        upload(b"probe")
        download()
    except Exception as e:  # noqa: BLE001 - report why, run the other clients
        return None, f"s3torchconnector failed against {server.backend}: {type(e).__name__}: {e}"
    return (upload, download), ""


def throughput(server, sizes: list[int], repeats: int) -> list[tuple]:
    from trainer.config import S3Config
    from trainer.storage import open_store

    ours = open_store("s3://bench/ours", S3Config(server.endpoint, "us-east-1", "path", ""))
    raw = server.client()
    clients = {
        "ours": (lambda data: ours.write_bytes("blob", data), lambda: ours.read_bytes("blob")),
        "boto3": (lambda data: raw.upload_fileobj(io.BytesIO(data), "bench", "raw/blob"),
                  lambda: raw.download_fileobj("bench", "raw/blob", io.BytesIO())),
    }
    crt, why = connector_clients(server)
    if crt:
        clients["s3torchconnector"] = crt
    else:
        print(f"  ({why}; its column is empty)")
    names = list(clients)
    print(f"{'size':>8} {'op':>8} " + " ".join(f"{n + ' MB/s':>21}" for n in names) + f" {'ours/fastest':>13}")
    rows = []
    for size in sizes:
        data = os.urandom(size)
        seconds = {(op, n): [] for op in ("upload", "download") for n in names}
        failed: dict[str, str] = {}  # a client that failed at this size: its error, and no more tries
        for i in range(max(repeats, min(5 * repeats, repeats * 100 * MB // size))):  # small: more, noisier
            order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
            for op, index in (("upload", 0), ("download", 1)):
                for n in (n for n in order if n not in failed):
                    call = (lambda: clients[n][0](data)) if op == "upload" else clients[n][1]
                    try:
                        seconds[op, n].append(timed(call))
                    except Exception as e:  # noqa: BLE001 - a raw client's failure is a result too
                        failed[n] = f"{op}: {type(e).__name__}: {str(e)[:160]}"
        for n, why in failed.items():
            print(f"  {n} failed at {size // MB} MB ({why}); its cells are 0")
        for op in ("upload", "download"):
            rate = {n: size / MB / statistics.median(seconds[op, n]) if n not in failed else 0.0 for n in names}
            fastest = max(rate[n] for n in names if n != "ours") or rate["ours"]
            rows.append((server.backend, size, op, rate, rate["ours"] / fastest))
            print(f"{size // MB:>6}MB {op:>8} " + " ".join(f"{rate[n]:>21.1f}" for n in names)
                  + f" {rate['ours'] / fastest:>13.2f}", flush=True)
        data = None  # free it before the next size is made
    return rows


class ModelOnly:
    """The Trainer's checkpoint interface, with only a model of `size` bytes of fp32 weights to save."""

    def __init__(self, size: int, device: str = "cpu"):
        import torch

        self.model = torch.nn.Linear(size // 4 // 1000, 1000, bias=False, device=device)
        self.state = SimpleNamespace(step=0)

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {},
                "train_state": {"step": self.state.step}, "rng": {}}

    def train_a_little(self) -> None:
        import torch

        with torch.no_grad():
            self.model.weight.add_(1.0)  # training mutates the weights while an upload may still run


def manager_for(server, prefix: str, async_save: bool = False, uri: str = ""):
    """A CheckpointManager for s3://bench/<prefix> on `server` (or for `uri`, e.g. file://, with no server)."""
    from trainer.chart import default_values
    from trainer.config import trainer_config_from_values
    from trainer.values import merge, validate
    from trainer.worker.checkpoint import CheckpointManager
    from trainer.worker.distributed import RankInfo

    info = RankInfo("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)
    values = merge(default_values(), {"checkpoint": {"uri": uri or f"s3://bench/{prefix}", "asyncSave": async_save,
                                                     "keepLast": 2},
                                      "s3": {"endpoint": server.endpoint if server else ""}})
    return CheckpointManager(trainer_config_from_values("bench", validate(values)), info)


class NoDigest:
    """hashlib.sha256's stand-in that does no work: the save without its checksum."""

    def __init__(self, data: bytes = b""):
        pass

    def hexdigest(self) -> str:
        return "0" * 64


@contextmanager
def checksums(enabled: bool):
    if enabled:
        yield
        return
    with mock.patch("trainer.storage.hashlib", SimpleNamespace(sha256=NoDigest)):
        yield


def checksum_cost(server, size: int, repeats: int) -> float:
    trainer = ModelOnly(size)
    managers = {on: manager_for(server, f"sum-{on}") for on in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for on in ((True, False) if i % 2 == 0 else (False, True)):  # alternate who goes first
            trainer.state.step += 1
            with checksums(on):
                times[on].append(timed(lambda: managers[on].save(trainer)))
            trainer.train_a_little()
    data = os.urandom(size)
    digest = statistics.median(timed(lambda: hashlib.sha256(data).hexdigest()) for _ in range(repeats))
    with_sum, without = statistics.median(times[True]), statistics.median(times[False])
    share = (with_sum - without) / with_sum
    print(f"\ncheckpoint of {size // MB} MB, sync save, median of {repeats}: with SHA-256 {with_sum * 1000:.0f} ms, "
          f"without {without * 1000:.0f} ms -> checksum costs {100 * share:.1f}% of the save "
          f"(SHA-256 alone: {digest * 1000:.0f} ms = {100 * digest / with_sum:.1f}%)", flush=True)
    return share


def async_stall(server, size: int, repeats: int) -> None:
    trainer = ModelOnly(size)
    print(f"\ncheckpoint of {size // MB} MB: time the training thread is blocked per save (median of {repeats}; "
          "async saves 1.5x the sync save time apart)")
    stalls, gap = {}, 0.2
    for mode in ("sync", "async"):
        manager = manager_for(server, mode, async_save=mode == "async")
        times = []
        for _ in range(repeats):
            trainer.state.step += 1
            times.append(timed(lambda: manager.save(trainer)))
            time.sleep(gap)  # "training" between saves, longer than one upload
            trainer.train_a_little()
        total = timed(manager.close)
        stalls[mode] = statistics.median(times)
        gap = 1.5 * stalls["sync"]
        print(f"  {mode:>5}: stall {stalls[mode] * 1000:8.1f} ms   (final wait {total * 1000:.0f} ms)", flush=True)
    print(f"  async removes {100 * (1 - stalls['async'] / stalls['sync']):.0f}% of the stall "
          f"(ratio sync/async {stalls['sync'] / stalls['async']:.1f}x)")


def summary(rows: list[tuple]) -> None:
    print("\nsummary: ours / fastest raw client (goal >= 0.90)")
    for backend, size, op, _, ratio in rows:
        print(f"  {backend:>9} {size // MB:>5}MB {op:>8} {ratio:5.2f} {'ok' if ratio >= 0.9 else 'BELOW GOAL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=("seaweedfs", "moto", "both"), default="both")
    parser.add_argument("--large", action="store_true", help="also 1 GB objects")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from tests.s3server import BACKENDS, CREDENTIALS, S3Server, weed_binary

    os.environ.update(CREDENTIALS)
    backends = BACKENDS if args.server == "both" else (args.server,)
    if "seaweedfs" in backends and not weed_binary():
        sys.exit("storage_throughput: KUBETRAIN_WEED is not set: run "
                 "`eval \"$(bash scripts/install-test-tools.sh)\"` first, or pass --server moto")
    sizes = [10 * MB, 100 * MB] + ([1000 * MB] if args.large else [])
    rows = []
    for backend in backends:
        print(f"\n== {backend} ==")
        server = S3Server(backend=backend).start()
        try:
            server.create_bucket("bench")
            rows += throughput(server, sizes, args.repeats)
            checksum_cost(server, 100 * MB, 3 * args.repeats)  # a small difference: more repeats
            async_stall(server, 100 * MB, args.repeats)
        finally:
            server.stop()
    summary(rows)


if __name__ == "__main__":
    main()
