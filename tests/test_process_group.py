"""Every collective is safe on NCCL. NCCL takes only CUDA tensors, and the loop's control collectives
(eval batch counts under FSDP, checkpoint flags, generation's synced_gpus) use small CPU tensors: an
NCCL run's default group must carry a CPU backend beside NCCL, or its first FSDP evaluation fails.
A CPU-only machine cannot run NCCL, so this checks the group the trainer asks torch for, and that a
group of that form (device-type map) routes CPU tensors on a real 2-process gloo run."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.worker.distributed import ProcessGroup, RankInfo, group_backends


def test_an_nccl_run_gets_gloo_beside_it_for_cpu_tensors():
    assert group_backends("nccl") == "cpu:gloo,cuda:nccl"
    assert group_backends("gloo") == "gloo"


def test_the_process_group_is_created_with_that_map(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    info = RankInfo(launcher="pytorchjob", rank=0, world_size=2, local_rank=0, local_world_size=1, node_rank=0,
                    nnodes=2, master_addr="127.0.0.1", master_port=29500)
    with ProcessGroup(info, "nccl", 30):
        pass
    assert calls and calls[0]["backend"] == "cpu:gloo,cuda:nccl", calls


def _worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The NCCL map's form with gloo standing in for the device backend (no CUDA here).
    dist.init_process_group("cpu:gloo,cuda:gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        count = torch.tensor([rank + 3], dtype=torch.int64)  # as even_eval_batches does
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        out.put((rank, int(count)))
    finally:
        dist.destroy_process_group()


def test_a_device_type_map_routes_cpu_control_tensors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [(0, 4), (1, 4)]


if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)
