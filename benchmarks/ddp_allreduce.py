"""DDP's gradient all-reduce vs a raw `torch.distributed.all_reduce` of the same bytes, same group.

Two gloo processes on loopback train an MLP (default ~8M parameters, 32 MB of
fp32 gradients) wrapped by our `trainer.worker.parallel.ddp`, under the worker's
host-memory setting. Per iteration, alternating, each after a barrier:

  - forward+backward with DDP's gradient sync, and the same under `no_sync()`:
    their difference is what DDP's communication adds to a step, after bucketing
    and overlap with backward;
  - one raw all_reduce of a flat tensor with as many elements as the gradients
    (the goal's baseline: raw/DDP >= 0.9);
  - the same all_reduce followed by dividing by the world size: the least any
    gradient *average* costs, since gloo has no AVG;
  - the PyTorch tutorial's hand-written `average_gradients` (one all_reduce and
    one division per parameter), what DDP replaces;
  - the breakdown of DDP's own work: all_reduces in DDP's bucket sizes, and the
    averaging copy of every gradient into its bucket (local, no network).

Medians of --iters iterations after warm-up, in each of --runs fresh pairs of
processes; the summary line gives the median over runs. "cores busy per rank" is the
process CPU time (gloo's threads included) per wall second of the raw all_reduce: on
loopback the collective is CPU work, which can overlap backward only on a free core.

    python benchmarks/ddp_allreduce.py [--width 2048] [--layers 2] [--iters 20] [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GOAL = 0.9
ROWS = ("synced", "no_sync", "raw", "raw_average", "tutorial", "buckets", "copy")


def timed(fn) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of the whole process (every thread, gloo's included)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def bucket_numels(model, numel: int) -> list[int]:
    """Elements per DDP bucket, as DDP built them after the first iteration."""
    data = model._get_ddp_logging_data()
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes", "")  # bytes, "a, b"
    numels = [int(size) // 4 for size in str(sizes).replace(",", " ").split()]
    return numels if sum(numels) == numel else [numel]


def worker(rank: int, world: int, port: int, args, out) -> None:
    from trainer.worker.host_memory import keep_freed_memory
    from trainer.worker.parallel import ddp

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = ddp(nn.Sequential(*layers, nn.Linear(args.width, 10)), torch.device("cpu"))
    inputs, targets = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()
    grads = [torch.randn_like(p) for p in model.parameters()]  # the tutorial's per-parameter tensors
    numel = sum(g.numel() for g in grads)
    flat, source = torch.zeros(numel), torch.randn(numel)
    buckets: list[torch.Tensor] = []

    def step() -> None:
        loss_fn(model(inputs), targets).backward()
        model.zero_grad(set_to_none=True)  # as our loop does

    def step_no_sync() -> None:
        with model.no_sync():
            step()

    def raw() -> None:
        dist.all_reduce(flat)

    def raw_average() -> None:
        dist.all_reduce(flat)
        flat.div_(world)

    def tutorial() -> None:
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world

    def in_buckets() -> None:
        for bucket in buckets:
            dist.all_reduce(bucket)

    def averaging_copy() -> None:  # what DDP's reducer does per gradient: bucket = grad * (1 / world)
        torch.mul(source, 1.0 / world, out=flat)

    kinds = dict(zip(ROWS, (step, step_no_sync, raw, raw_average, tutorial, in_buckets, averaging_copy)))
    times: dict[str, list[float]] = {kind: [] for kind in ROWS}
    raw_cores = []  # CPU seconds per wall second during the raw all_reduce
    for i in range(args.warmup + args.iters):
        if i == args.warmup:  # by now DDP has rebuilt its buckets in gradient-ready order
            buckets = [torch.zeros(n) for n in bucket_numels(model, numel)]
        for kind, fn in kinds.items():
            dist.barrier()
            elapsed, cpu = timed(fn)
            if i >= args.warmup:
                times[kind].append(elapsed)
                if kind == "raw":
                    raw_cores.append(cpu / elapsed)
    if rank == 0:
        medians = {kind: statistics.median(t) for kind, t in times.items()}
        out.put((numel, [b.numel() for b in buckets], medians, statistics.median(raw_cores)))
    dist.destroy_process_group()


def one_run(args) -> tuple[int, list[int], dict[str, float], float]:
    from trainer.controller.local import free_port

    out = mp.get_context("spawn").Queue()
    mp.spawn(worker, args=(2, free_port(), args, out), nprocs=2, join=True)
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.warmup < 3:
        parser.error("--warmup: at least 3 (DDP rebuilds its buckets in the second iteration)")

    ratios = []
    for run in range(1, args.runs + 1):
        numel, buckets, t, raw_cores = one_run(args)
        comm = t["synced"] - t["no_sync"]
        ratios.append(t["raw"] / comm)
        ms = {kind: 1000 * value for kind, value in t.items()}
        print(f"run {run}: {numel / 1e6:.1f}M parameters, {4 * numel / 1e6:.0f} MB fp32 gradients, "
              f"DDP buckets {', '.join(f'{4 * n / 1e6:.1f}' for n in buckets)} MB; 2 gloo processes, "
              f"{args.threads} thread(s) each; ms, medians of {args.iters} iterations")
        print(f"  forward+backward, DDP sync               {ms['synced']:7.1f}")
        print(f"  forward+backward, no_sync()              {ms['no_sync']:7.1f}")
        print(f"  DDP's communication cost (difference)    {1000 * comm:7.1f}")
        print(f"    all_reduce in DDP's buckets            {ms['buckets']:7.1f}")
        print(f"    averaging copy into the buckets        {ms['copy']:7.1f}")
        print(f"    rest: contention (+), overlap (-)      {1000 * comm - ms['buckets'] - ms['copy']:7.1f}")
        print(f"  raw all_reduce, same bytes               {ms['raw']:7.1f}   raw/DDP {t['raw'] / comm:.2f}   "
              f"(keeps {raw_cores:.2f} cores busy per rank)")
        print(f"  raw all_reduce + divide by world         {ms['raw_average']:7.1f}   "
              f"(raw+divide)/DDP {t['raw_average'] / comm:.2f}")
        print(f"  tutorial average_gradients (per param)   {ms['tutorial']:7.1f}   tutorial/DDP "
              f"{t['tutorial'] / comm:.2f}")
    median = statistics.median(ratios)
    print(f"ratio raw/DDP: median {median:.3f} over {args.runs} runs ({', '.join(f'{r:.2f}' for r in ratios)}); "
          f"{'met' if median >= GOAL else 'MISSED'}: goal >= {GOAL}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
