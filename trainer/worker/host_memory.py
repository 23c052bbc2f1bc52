"""glibc's malloc set for a training loop: freed host memory stays in the process.

A CPU training step frees and reallocates the same activation and gradient buffers
(megabytes each) every step. glibc's defaults hand such blocks back to the kernel: above a
dynamic mmap threshold they are unmapped on free, and a heap top of free memory larger than
twice that threshold is trimmed. The next step then faults the same pages in again,
zero-filled by the kernel. On the CIFAR ConvNet at batch 64 that is about 5,000 minor page
faults per step, a quarter of the step's time. How many there are depends on the order of
earlier allocations, so the same code ran at two speeds from one process to the next.
`benchmarks/host_memory.py` measures this.

Fixing both thresholds keeps the freed blocks in the heap for the next step. This is what
PyTorch's CUDA caching allocator does on the GPU, and what jemalloc and TCMalloc (the CPU
tuning advice) do on the host. The cost is bounded: the heap keeps at most `TRIM_THRESHOLD`
of free memory at its top. Blocks above `MMAP_THRESHOLD` (glibc's largest allowed) are still
mapped fresh. A user who tunes glibc (MALLOC_* or GLIBC_TUNABLES) or preloads another
allocator keeps that choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

# mallopt(3) parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2); setting it stops the dynamic one
TRIM_THRESHOLD = 1 << 30


# What a user sets to choose these thresholds: glibc's environment variables and tunables
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                 "glibc.malloc.mmap_max")


def _user_tuned(env: Mapping[str, str]) -> str | None:
    """The variable through which the user chose the allocator's thresholds, if any."""
    for name in USER_SETTINGS:
        if name in env:
            return name
    if any(tunable in env.get("GLIBC_TUNABLES", "") for tunable in USER_TUNABLES):
        return "GLIBC_TUNABLES"
    if "malloc" in env.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's malloc
        return "LD_PRELOAD"
    return None


def keep_freed_memory(env: Mapping[str, str] | None = None) -> str:
    """Set glibc's thresholds (once per process, before training allocates); says what it did."""
    env = os.environ if env is None else env
    chosen = _user_tuned(env)
    if chosen:
        return f"host memory: glibc malloc left as {chosen} sets it"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "host memory: not glibc, allocator left as it is"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "host memory: glibc refused the malloc thresholds, left as they were"
    return (f"host memory: glibc malloc keeps freed blocks (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 30} GiB)")
