"""What DDP and FSDP cost with world size 1: the same model and steps, plain vs wrapped.

One process, a process group of one (NCCL on a GPU, gloo on CPU). The model is
a stack of `--layers` Linear+GELU blocks of `--width` (an nn.ModuleList, so FSDP
shards block by block, as trainer/worker/parallel.py does for a task), trained
with AdamW on a fixed batch. Plain, DDP (our `ddp()`) and FSDP2 (our `_shard()`)
take turns, in rotating order; each time is `--steps` steps, synchronized at the
end; medians and wrapped/plain ratios are printed.

    python benchmarks/parallel_overhead.py [--width 4096] [--layers 8] [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from trainer.worker.parallel import _shard, ddp


class Blocks(nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(kind: str, args, device: torch.device, precision: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Blocks(args.width, args.layers).to(device)
    if kind == "ddp":
        model = ddp(model, device)
    elif kind == "fsdp":
        model = _shard(model, list(model.blocks), precision, device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run(model, optimizer, batch, labels, steps: int, device, precision: str) -> float:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = nn.functional.cross_entropy(model(batch).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            batch = torch.randn(args.batch, args.width, device=device)
            labels = torch.randint(0, 10, (args.batch,), device=device)
            kinds = ["plain", "ddp", "fsdp"]
            built = {kind: build(kind, args, device, args.precision) for kind in kinds}
            for kind in kinds:  # warm-up: kernels, allocator, DDP's first-iteration bucket rebuild
                run(*built[kind], batch, labels, 3, device, args.precision)
            times = {kind: [] for kind in kinds}
            for i in range(args.repeats):
                for kind in kinds[i % 3:] + kinds[:i % 3]:
                    times[kind].append(run(*built[kind], batch, labels, args.steps, device, args.precision))
        finally:
            dist.destroy_process_group()
    params = sum(p.numel() for p in Blocks(args.width, args.layers).parameters())
    print(f"{device} ({backend}, world size 1), {params / 1e6:.0f}M parameters, {args.precision}, "
          f"batch {args.batch}: medians of {args.repeats} rotating repeats x {args.steps} steps")
    plain = statistics.median(times["plain"])
    print(f"{'wrapper':>8} {'ms/step':>9} {'plain/wrapped':>14}")
    for kind in kinds:
        median = statistics.median(times[kind])
        print(f"{kind:>8} {median * 1000:>9.2f} {plain / median:>14.3f}")


if __name__ == "__main__":
    main()
