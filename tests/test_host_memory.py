"""glibc's malloc thresholds the trainer sets (trainer/worker/host_memory.py), in real interpreters."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from trainer.worker.host_memory import keep_freed_memory

# A step's worth of large buffers, freed and allocated again: the page faults each round costs. 100 MiB in
# all is more than glibc's dynamic trim threshold can ever reach (2 x its 32 MiB mmap threshold maximum), so
# with the defaults every round gives the pages back, whatever the interpreter allocated before.
PROBE = """
import resource, sys, torch
from trainer.worker.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    print(keep_freed_memory(), file=sys.stderr)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(5 << 20) for _ in range(5)]  # 5 x 20 MiB
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""
PAGES_PER_ROUND = 5 * (20 << 20) // 4096


def faults_per_round(mode: str) -> tuple[list[int], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip()), result.stderr


def test_freed_buffers_are_reused_without_faulting_their_pages_in_again():
    default, _ = faults_per_round("default")
    kept, said = faults_per_round("kept")
    # glibc's defaults give the buffers back to the kernel: every round faults most of their pages again.
    assert min(default[-4:]) > PAGES_PER_ROUND // 3, default
    # Kept, the later rounds reuse the heap's pages.
    assert max(kept[-4:]) < 100, kept
    assert "glibc malloc keeps freed blocks (mmap threshold 32 MiB, trim threshold 1 GiB)" in said, said


def test_a_users_own_allocator_settings_are_left_alone():
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) == \
        "host memory: glibc malloc left as MALLOC_TRIM_THRESHOLD_ sets it"
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == \
        "host memory: glibc malloc left as GLIBC_TUNABLES sets it"
    assert keep_freed_memory({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == \
        "host memory: glibc malloc left as LD_PRELOAD sets it"
