"""The rank contract (docs/architecture.md): operator env, torchrun env, single process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO
from trainer.controller.local import operator_env
from trainer.errors import UserError
from trainer.worker.distributed import resolve_rank


def torchrun_env(node: int, local: int, nnodes: int, nproc: int) -> dict:
    """The operator's env for replica `node`, with torchrun's per-process variables on top."""
    env = operator_env(node, nnodes, nproc, 23456)
    env.update({
        "TORCHELASTIC_RUN_ID": "none", "RANK": str(node * nproc + local), "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(node), "WORLD_SIZE": str(nnodes * nproc),
    })
    return env


@pytest.mark.parametrize("node", [0, 1, 2])
def test_operator_env_one_process_per_pod(node):
    info = resolve_rank(operator_env(node, 3, 1, 23456))
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("pytorchjob", node, 3, 0)
    assert info.replica_name == ("master-0" if node == 0 else f"worker-{node}")


@pytest.mark.parametrize("node, local", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_torchrun_in_pod_two_processes_per_pod(node, local):
    info = resolve_rank(torchrun_env(node, local, nnodes=2, nproc=2))
    assert info.launcher == "torchrun"
    assert info.rank == node * 2 + local
    assert (info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (4, local, 2, node)


def test_single_process_without_launcher_env():
    info = resolve_rank({})
    assert (info.launcher, info.rank, info.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("env, needle", [
    ({**operator_env(0, 2, 2, 1), }, "needs torchrun"),  # nproc 2 without torchrun
    ({**operator_env(0, 2, 1, 1), "WORLD_SIZE": "3"}, "PET_NNODES=2"),
    ({**operator_env(0, 2, 1, 1), "RANK": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({**torchrun_env(1, 0, 2, 2), "PET_NPROC_PER_NODE": "4"}, "PET_NPROC_PER_NODE=4"),
    ({**torchrun_env(1, 0, 2, 2), "WORLD_SIZE": "6"}, "WORLD_SIZE=6"),
    ({**operator_env(0, 2, 1, 1), "RANK": "zero"}, "RANK='zero'"),
])
def test_inconsistent_env_fails_fast_with_a_clear_message(env, needle):
    with pytest.raises(UserError, match=None) as err:
        resolve_rank(env)
    assert needle in str(err.value)


def test_trainer_v2s_auto_procs_per_node_defers_to_torchrun():
    """A TrainJob without numProcPerNode on GPU nodes gets PET_NPROC_PER_NODE=auto; torchrun resolves it."""
    for node in (0, 1):
        for local in (0, 1, 2):
            info = resolve_rank({**torchrun_env(node, local, nnodes=2, nproc=3), "PET_NPROC_PER_NODE": "auto"})
            assert (info.rank, info.world_size, info.local_world_size) == (node * 3 + local, 6, 3)


def test_elastic_nnodes_range_is_accepted():
    env = {**operator_env(1, 2, 1, 1), "PET_NNODES": "1:4"}
    assert resolve_rank(env).world_size == 2


def test_trainer_process_exits_2_on_inconsistent_env(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("experiment: envcheck\n")
    env = {"PATH": "/usr/bin:/bin", **operator_env(0, 2, 1, 1), "WORLD_SIZE": "5"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "WORLD_SIZE=5" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 1.5),                                    # cgroup v2
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_limit_is_read_from_the_containers_cgroup(tmp_path, files, cores):
    from trainer.worker.distributed import cgroup_cpu_limit

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(str(tmp_path)) == cores


def test_threads_follow_the_cpu_limit_unless_omp_num_threads_says_otherwise():
    import torch

    from trainer.worker.distributed import fit_threads_to_cpu_limit

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        info = resolve_rank(operator_env(0, 2, 1, 23456))
        assert fit_threads_to_cpu_limit(info, env={"OMP_NUM_THREADS": "2"}, limit=1.0) == 2
        assert fit_threads_to_cpu_limit(info, env={}, limit=1.0) == 1  # a 1-CPU pod on a 2-core node
    finally:
        torch.set_num_threads(before)
