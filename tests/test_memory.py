"""release_memory returns glibc's free heap pages to the OS (what the recipe runner calls between steps)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

import pytest

from kalm_st.memory import release_memory


def _private_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_freed_heap_pages_go_back_to_the_os() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunk = 64 * 1024  # below glibc's mmap threshold: heap memory, which free() keeps for later mallocs
    blocks = []
    for _ in range(3200):  # 200 MiB, every page touched
        block = libc.malloc(chunk)
        ctypes.memset(block, 1, chunk)
        blocks.append(block)
    pin = libc.malloc(chunk)  # a live block above the freed ones: the heap top cannot shrink by itself
    for block in blocks:
        libc.free(block)
    held = _private_mib()
    assert release_memory() is True
    released = held - _private_mib()
    libc.free(pin)
    assert released > 150, f"only {released:.0f} MiB of 200 MiB went back to the OS"
