"""Process-wide settings for training, sampling and evaluation: threads, the memory allocator, and this process's
place among the ones a launcher started (its share of the work)."""

from __future__ import annotations

import ctypes
import os

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

# mallopt(3) parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the kernel. By default every activation over 32 MiB is
    mmap'ed, freed with munmap and page-faulted in (and zeroed) again at the next step, so large-image training
    spends much of its CPU time in the kernel (figures: benchmarks/HISTORY.md, cpu_allocator.py). This is the reuse
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


def check_world_size(state) -> None:
    """A launch where Accelerate and the launcher disagree runs N independent jobs over one output folder.
    `state` is an Accelerator or a PartialState."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={launched} processes but Accelerate sees {state.num_processes}; "
            "launch with `accelerate launch --num_processes N SCRIPT` (or torchrun) so they agree"
        )


def process_state() -> PartialState:
    """This process's PartialState, checked against the launcher. `accelerate launch --cpu` says so only through
    ACCELERATE_USE_CPU, which Accelerator reads and PartialState does not: without it, CPU processes would each
    believe they run alone."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world_size(state)
    return state


def end_processes() -> None:
    """Under a launch, at the end of a command: wait for every process, then close the process group. A process that
    leaves with its gloo or NCCL group still open can abort at interpreter shutdown ("terminate called without an
    active exception"), failing the launch after all its work was done; evaluation's other processes finish long
    before the main one, which writes the report."""
    state = process_state()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def process_device(state: PartialState) -> str:
    """This process's device: its own GPU under a multi-GPU launch; plain "cpu" for the "cpu:<rank>" a CPU launch
    reports, so what a run records does not depend on the process count."""
    return "cpu" if state.device.type == "cpu" else str(state.device)


def process_share(n: int, block: int, state: PartialState) -> range:
    """This process's contiguous share of range(n), made of whole blocks of `block` items (the last block may be
    short). Blocks are cut from range(n) the same way whatever the process count, so every item is processed in
    the same block, with the same neighbours, by 1 process or 8: the arithmetic, hence the result, is the same."""
    blocks = -(-n // block)
    with state.split_between_processes(list(range(blocks))) as mine:
        if not mine:
            return range(0)
        return range(mine[0] * block, min(n, (mine[-1] + 1) * block))
