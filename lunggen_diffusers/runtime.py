"""Process-wide CPU settings for training and sampling: threads and the memory allocator."""

from __future__ import annotations

import ctypes
import os

import torch

# mallopt(3) parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the kernel. By default every activation over 32 MiB is
    mmap'ed, freed with munmap and page-faulted in (and zeroed) again at the next step, so large-image training
    spends much of its CPU time in the kernel (figures: benchmarks/README.md, cpu_allocator.py). This is the reuse
    PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, without a preloaded library; the cost is a higher
    peak RSS, kept until the process ends.
    Returns whether it applied (glibc only: a no-op on macOS, Windows and musl)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
    except (OSError, TypeError):  # Windows
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    # -1 disables trimming and 0 disables mmap for large blocks, as documented in mallopt(3).
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def set_cpu_threads(threads: int | None, processes_on_machine: int) -> int:
    """Share this machine's cores among its processes (`accelerate launch` sets OMP_NUM_THREADS=1, which leaves all
    but one core idle); `threads` overrides."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = threads or max(1, cores // processes_on_machine)
    torch.set_num_threads(n)
    return n
