import subprocess
import sys

import pytest
import torch

from lunggen_diffusers.runtime import set_cpu_threads

# Minor page faults of five 64 MiB allocations (16,384 pages each), before and after keep_freed_memory().
PROBE = """
import resource, torch
from lunggen_diffusers.runtime import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MiB: over glibc's largest mmap threshold, so mmap'ed by default
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
applied = keep_freed_memory()
faults(), faults()  # the heap grows until freed blocks fit the next request
print(default, applied, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, applied, after = int(out[0]), out[1] == "True", int(out[2])
    assert default > 50_000  # the kernel zeroes and maps every page again: what made CPU steps slow
    assert applied
    assert after < 100


def test_cpu_threads_are_shared_among_processes():
    threads = torch.get_num_threads()
    try:
        assert set_cpu_threads(3, 2) == 3 == torch.get_num_threads()
        assert set_cpu_threads(None, 10**6) == 1  # more processes than cores still gets one thread
    finally:
        torch.set_num_threads(threads)
