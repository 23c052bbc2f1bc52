"""glibc's malloc thresholds the trainer sets (trainer/worker/host_memory.py), in real interpreters."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from trainer.worker.host_memory import keep_freed_memory

# A step's worth of large blocks, written, freed and allocated again: the page faults each round costs.
# glibc's own malloc and free, so that no other allocation lands between them: with torch tensors the
# defaults' faults depend on what else the heap holds (from round 5 on, they kept faulting on one machine
# and stopped on another), which is the nondeterminism keep_freed_memory removes, but no test of it. With the defaults
# the first round's blocks are mmapped, then the heap's free top (100 MiB) stays above the dynamic trim
# threshold (2 x 20 MiB), so every round gives the pages back and faults them in again.
PROBE = """
import ctypes, resource, sys
from trainer.worker.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    print(keep_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(20 << 20) for _ in range(5)]
    for block in blocks:
        ctypes.memset(block, 1, 20 << 20)
    for block in blocks:
        libc.free(block)
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
    # glibc's defaults give the blocks back to the kernel: every round faults their pages in again.
    assert min(default[1:]) > PAGES_PER_ROUND // 2, default
    # Kept, every round after the first reuses the heap's pages.
    assert max(kept[1:]) < 100, kept
    assert "glibc malloc keeps freed blocks (mmap threshold 32 MiB, trim threshold 1 GiB)" in said, said


def test_a_users_own_allocator_settings_are_left_alone():
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) == \
        "host memory: glibc malloc left as MALLOC_TRIM_THRESHOLD_ sets it"
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == \
        "host memory: glibc malloc left as GLIBC_TUNABLES sets it"
    assert keep_freed_memory({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == \
        "host memory: glibc malloc left as LD_PRELOAD sets it"
