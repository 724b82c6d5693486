"""The CPU dry run fixes glibc's mmap threshold so that its peak RSS reads the memory a step holds
(medcap.train.dry_run.fix_mmap_threshold). Each case runs in a fresh interpreter: the setting is
process-wide and cannot be undone."""

from __future__ import annotations

import ctypes
import subprocess
import sys

from tests.fixtures import skip_missing

# Mid-size blocks freed between small survivors, the pattern of a checkpointed forward (a layer's
# activations around the input it keeps). A freed 16 MB block first lifts glibc's dynamic threshold,
# as a training step's first large tensors do.
PATTERN = """
import sys
import torch
from medcap.train.dry_run import fix_mmap_threshold

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(1 << 20)
x = torch.ones(4 << 20)
del x
before = rss()
big, small = [], []
for _ in range(40):
    big.append(torch.ones(2 << 20))  # 8 MB
    small.append(torch.ones(25_000))  # 100 KB that outlives it
big.clear()
print(rss() - before)
"""


def _retained(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_fixed_threshold_gives_freed_blocks_back():
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        skip_missing("glibc (the allocator this setting is for; other C libraries' behave otherwise)")
    # 40 x 8 MB freed: glibc's default keeps them (the heap cannot shrink under the survivors);
    # with the threshold fixed they were mapped on their own and are unmapped when freed.
    assert _retained("default") > 200e6
    assert _retained("fixed") < 40e6
