"""Process-level settings a training run makes: glibc keeps freed memory for reuse."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Page faults of allocating, touching and freeing a 20 MB block, twice: by default glibc
# maps the first from the OS and unmaps it on free, so the second is faulted in afresh.
REUSE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from vlmtrain.runtime import keep_freed_memory
    keep_freed_memory()
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(20 << 20)
    ctypes.memset(p, 1, 20 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_a_freed_block_without_page_faults():
    def faults(mode: str) -> list[int]:
        out = subprocess.run(
            [sys.executable, "-c", REUSE, mode], capture_output=True, text=True, check=True
        )
        return [int(x) for x in out.stdout.split()]

    pages = (20 << 20) // 4096
    default, kept = faults("default"), faults("keep")
    assert default[1] > 0.9 * pages  # faulted in again
    assert kept[0] > 0.9 * pages and kept[1] < 0.05 * pages  # reused
