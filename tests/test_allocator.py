"""retain_freed_memory: a freed block is reused without page faults (Linux, glibc only)."""

import platform
import subprocess
import sys

import pytest

FAULTS_OF_REALLOCATION = """
import resource, sys, torch
from brainmech import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def allocate_and_free():
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, above glibc's largest mmap threshold
    del block
for _ in range(16):  # the heap settles within 12 cycles (torch alone loaded; 4 with the whole package)
    allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    allocate_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", FAULTS_OF_REALLOCATION, mode], capture_output=True, text=True,
                         check=True)
    return int(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    pages = 5 * 64 * 2**20 // 4096  # every page of five fresh 64 MB blocks
    assert page_faults("default") > 0.5 * pages  # glibc maps each block afresh
    assert page_faults("retain") < 0.05 * pages  # the heap keeps the first block's pages
