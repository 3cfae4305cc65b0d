"""glibc ``malloc`` settings for runs that allocate and free megabyte arrays per tile.

A run allocates and frees tile-sized numpy arrays (megabytes each) thousands of times.
By default glibc gives worker threads arenas of their own, returns freed memory to the
kernel (trimming) and adapts its mmap threshold, so many of those arrays land on fresh
pages and every page faults once more. On an 8192 px slide (361 tiles of 512 px, 2
workers) that was 870,000 minor page faults and 4.8 s of kernel time; with one arena, a
fixed 32 MiB mmap threshold and no trimming below 1 GiB, 190,000 faults, 2.6 s of kernel
time and 4% less wall time, for a peak RSS 14% higher (a high-water mark, it does not
grow with the slide). ``pipelines/bench_compare.py`` measures runs with it.

The settings go to this process through ``mallopt`` and to child processes (Dask
workers of a local cluster) through the environment, which glibc reads at start-up. A
variable the user set is left alone, and so is a C library that is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS: dict[str, tuple[int, int]] = {
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 1),
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 << 20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 64 << 20),
}
"""Environment variable: (``mallopt`` parameter, value)."""


def tune_malloc() -> dict[str, int]:
    """Apply :data:`SETTINGS` to this process and, through the environment, its children.

    Call it early, before worker threads start (an arena limit only binds threads that
    have not allocated yet).

    Returns
    -------
    dict
        The settings applied to this process (empty where the C library is not glibc).
    """
    if not sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied: dict[str, int] = {}
    for name, (parameter, value) in SETTINGS.items():
        if name in os.environ:
            continue  # the user's choice, already read by glibc at start-up
        if mallopt(parameter, value) == 1:
            os.environ[name] = str(value)
            applied[name] = value
    return applied
