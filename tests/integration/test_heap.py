"""release_free_heap hands a fragmented heap's free pages back to the OS (what keeps stage peaks flat)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# In a fresh interpreter: 2,000 blocks of 100 KB (below glibc's mmap threshold, so they come from the heap),
# each followed by a small block that stays alive. Freeing the large ones leaves free chunks between live
# ones, which glibc's free() cannot return (only the top of the heap shrinks by itself).
FRAGMENT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from transfer.pipeline.heap import release_free_heap

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

large, small = [], []
for _ in range(2000):
    large.append(b"x" * 100_000)
    small.append(b"y" * 2_000)
grown = rss_mb()
del large
freed = rss_mb()
released = release_free_heap()
print(json.dumps({"grown": grown, "freed": freed, "released": released, "after": rss_mb()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_free_heap_returns_the_pages_free_left_in_a_fragmented_heap():
    done = subprocess.run([sys.executable, "-c", FRAGMENT, str(SRC)], capture_output=True, text=True, check=True)
    rss = json.loads(done.stdout)
    assert rss["grown"] > 190  # 2,000 x 100 KB touched
    assert rss["freed"] > 100  # free() alone kept most of it resident
    assert rss["released"] is True
    assert rss["after"] < rss["freed"] - 90  # handed back to the OS
