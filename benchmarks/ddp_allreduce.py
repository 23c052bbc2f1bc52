"""DDP's gradient all-reduce vs a raw `torch.distributed.all_reduce` of the same bytes, same group.

Two gloo processes on loopback train an MLP (default ~8M parameters, 32 MB of
fp32 gradients) wrapped by our `trainer.worker.parallel.ddp`. Per iteration,
alternating: forward+backward with DDP's gradient sync, the same under
`no_sync()` (no collective), and one raw all_reduce of a flat tensor holding as
many elements as the gradients. DDP's communication cost is the difference of
the first two (what it adds to a step, after bucketing and overlap with
backward); the ratio raw/DDP >= 0.9 means DDP costs at most ~1.1x the bare
collective. Medians of N iterations after warm-up.

    python benchmarks/ddp_allreduce.py [--width 2048] [--layers 2] [--iters 20] [--threads 1]
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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(rank: int, world: int, port: int, args, out) -> None:
    from trainer.worker.parallel import ddp

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = ddp(nn.Sequential(*layers, nn.Linear(args.width, 10)), torch.device("cpu"))
    inputs, targets = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()
    numel = sum(p.numel() for p in model.parameters())
    flat = torch.zeros(numel)

    def step() -> None:
        loss_fn(model(inputs), targets).backward()
        model.zero_grad(set_to_none=True)

    def step_no_sync() -> None:
        with model.no_sync():
            step()

    def raw() -> None:
        dist.all_reduce(flat)

    synced, unsynced, raws = [], [], []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        a = timed(step)
        dist.barrier()
        b = timed(step_no_sync)
        dist.barrier()
        c = timed(raw)
        if i >= args.warmup:
            synced.append(a), unsynced.append(b), raws.append(c)
    if rank == 0:
        out.put((numel, statistics.median(synced), statistics.median(unsynced), statistics.median(raws)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from trainer.controller.local import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.spawn(worker, args=(2, free_port(), args, out), nprocs=2, join=True)
    numel, synced, unsynced, raw = out.get()
    comm = synced - unsynced
    print(f"gradients: {numel / 1e6:.1f}M parameters, {4 * numel / 1e6:.0f} MB fp32, 2 gloo processes, "
          f"{args.threads} thread(s) each, medians of {args.iters}")
    print(f"  forward+backward, DDP sync   {1000 * synced:8.1f} ms")
    print(f"  forward+backward, no_sync()  {1000 * unsynced:8.1f} ms")
    print(f"  DDP's communication cost     {1000 * comm:8.1f} ms")
    print(f"  raw all_reduce, same bytes   {1000 * raw:8.1f} ms")
    print(f"  ratio raw/DDP = {raw / comm:.2f} ({'met' if raw / comm >= GOAL else 'MISSED'}: goal >= {GOAL})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
