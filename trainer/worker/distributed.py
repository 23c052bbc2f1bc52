"""The rank and world-size contract (docs/architecture.md).

Three launchers are recognised:
- torchrun (alone or inside a PyTorchJob pod): per-process RANK/WORLD_SIZE/LOCAL_RANK;
- the Kubeflow training operator without torchrun: RANK is the replica index,
  WORLD_SIZE = replicas x nprocPerNode, which must then be 1 process per pod;
- nothing: a single process.
Inconsistent arithmetic fails fast with a message naming the variables.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from trainer.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    launcher: str  # "torchrun", "pytorchjob" or "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replica_name(self) -> str:
        return "master-0" if self.node_rank == 0 else f"worker-{self.node_rank}"


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def _nnodes(env: Mapping[str, str]) -> int | None:
    """PET_NNODES is an integer, or `min:max` under an elastic policy (then unknown here)."""
    raw = env.get("PET_NNODES")
    if raw is None or ":" in raw:
        return None
    return _int(env, "PET_NNODES")


def _nproc(env: Mapping[str, str]) -> int | None:
    """PET_NPROC_PER_NODE is an integer, or a word torchrun resolves itself (Trainer v2 passes `auto`
    when a TrainJob leaves numProcPerNode unset on GPU nodes): then LOCAL_WORLD_SIZE says."""
    if env.get("PET_NPROC_PER_NODE") in (None, "auto", "cpu", "gpu"):
        return None
    return _int(env, "PET_NPROC_PER_NODE")


def resolve_rank(env: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", env.get("PET_MASTER_ADDR", "127.0.0.1"))
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    nnodes = _nnodes(env)
    nproc = _nproc(env)

    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env):
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
        node_rank = _int(env, "GROUP_RANK") if "GROUP_RANK" in env else rank // max(local_world, 1)
        if not 0 <= local_rank < local_world:
            raise UserError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
        if nproc is not None and nproc != local_world:
            raise UserError(
                f"torchrun started {local_world} processes per node but PET_NPROC_PER_NODE={nproc}"
            )
        if world % local_world:
            raise UserError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}")
        if nnodes is not None and world != nnodes * local_world:
            raise UserError(
                f"WORLD_SIZE={world} but PET_NNODES={nnodes} x LOCAL_WORLD_SIZE={local_world} = "
                f"{nnodes * local_world}"
            )
        info = RankInfo("torchrun", rank, world, local_rank, local_world, node_rank,
                        world // local_world, addr, port)
    elif "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        nproc = 1 if nproc is None else nproc
        if nproc != 1:
            raise UserError(
                f"PET_NPROC_PER_NODE={nproc} needs torchrun inside the pod; this process was started "
                "directly (set job.nprocPerNode: 1, or launch with torchrun)"
            )
        if nnodes is not None and world != nnodes * nproc:
            raise UserError(f"WORLD_SIZE={world} but PET_NNODES={nnodes} x PET_NPROC_PER_NODE={nproc}")
        info = RankInfo("pytorchjob", rank, world, 0, 1, rank, world, addr, port)
    else:
        info = RankInfo("single", 0, 1, 0, 1, 0, 1, addr, port)

    if info.world_size < 1:
        raise UserError(f"WORLD_SIZE={info.world_size} must be at least 1")
    if not 0 <= info.rank < info.world_size:
        raise UserError(f"RANK={info.rank} is outside WORLD_SIZE={info.world_size}")
    return info


def pick_backend(requested: str) -> str:
    if requested != "auto":
        if requested == "nccl" and not torch.cuda.is_available():
            raise UserError("training.distributed.backend: nccl needs a GPU; none is visible")
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(info: RankInfo, backend: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def group_backends(backend: str) -> str:
    """The default group's backend per device type. NCCL only takes CUDA tensors, and the loop's
    control collectives (eval batch counts, checkpoint flags, generation sync) use small CPU
    tensors: an NCCL run gets gloo beside it for those, as torchtitan does."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


class ProcessGroup:
    """Owns the default process group for the lifetime of a `with` block."""

    def __init__(self, info: RankInfo, backend: str, timeout_seconds: int):
        self.info, self.backend, self.timeout = info, backend, timeout_seconds

    def __enter__(self) -> "ProcessGroup":
        if self.info.world_size > 1:
            os.environ.setdefault("MASTER_ADDR", self.info.master_addr)
            os.environ.setdefault("MASTER_PORT", str(self.info.master_port))
            dist.init_process_group(
                backend=group_backends(self.backend),
                rank=self.info.rank,
                world_size=self.info.world_size,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        return self

    def __exit__(self, *exc) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The container's CPU limit in cores from its cgroup quota (v2 `cpu.max`, v1 `cfs_quota_us`), or None."""
    try:
        quota, period = open(f"{root}/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota = int(open(f"{root}/{folder}/cpu.cfs_quota_us").read())
            period = int(open(f"{root}/{folder}/cpu.cfs_period_us").read())
            return None if quota <= 0 else quota / period
        except (OSError, ValueError):
            continue
    return None


def fit_threads_to_cpu_limit(info: RankInfo, env: Mapping[str, str] | None = None,
                             limit: float | None = None) -> int:
    """Without OMP_NUM_THREADS, give each process its share of the container's CPU limit.

    torch sizes its thread pool by the cores it sees, which in a pod are the
    node's, not the limit's: a 1-CPU pod on a 2-core node ran 2 threads and
    was throttled to a sixth of the speed of 1 thread. torchrun sets
    OMP_NUM_THREADS=1 for several processes, the local runner its own share.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    limit = cgroup_cpu_limit() if limit is None else limit
    if limit is not None:
        threads = max(1, int(limit // max(info.local_world_size, 1)))
        if threads < torch.get_num_threads():
            log.info("CPU limit %.2g cores for %d process(es): %d torch threads each (set OMP_NUM_THREADS "
                     "to choose)", limit, info.local_world_size, threads)
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def log_rank_table(info: RankInfo, device: torch.device, backend: str) -> None:
    """Rank 0 logs one table with a row per rank: who runs where."""
    row = {
        "rank": info.rank, "local": info.local_rank, "node": info.node_rank,
        "replica": info.replica_name, "host": socket.gethostname(), "pid": os.getpid(),
        "device": str(device), "threads": torch.get_num_threads(),
    }
    rows = [row]
    if dist.is_initialized():
        rows = [None] * info.world_size  # type: ignore[list-item]
        dist.all_gather_object(rows, row)
    if not info.is_main:
        return
    header = f"launcher={info.launcher} world_size={info.world_size} nnodes={info.nnodes} " \
             f"nproc_per_node={info.local_world_size} backend={backend} " \
             f"master={info.master_addr}:{info.master_port}"
    cols = list(row)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = [" ".join(c.ljust(widths[c]) for c in cols)]
    lines += [" ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    log.info("rank table: %s\n%s", header, "\n".join(lines))
