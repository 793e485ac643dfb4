"""The allocator setting of the command line: large tensors come from the heap and stay there."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import torch
from qrobust.hardware import keep_large_allocations

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "tuned":
    assert keep_large_allocations()
before = libc.mallinfo2().hblkhd
t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB: over glibc's largest default threshold
mapped = libc.mallinfo2().hblkhd - before
del t
print(mapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt/mallinfo2 are glibc's")
def test_keep_large_allocations_serves_and_keeps_large_blocks_in_the_heap():
    def probe(mode):  # [a fresh mapping?, kept in the heap once freed?], in a fresh process
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.split()

    assert probe("default")[0] == "True"  # by default the 64 MB tensor is mapped afresh...
    assert probe("tuned") == ["False", "True"]  # ...tuned, it comes from the heap and stays
