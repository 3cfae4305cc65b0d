"""glibc ``malloc`` settings for runs that allocate and free megabyte arrays per tile.

A run allocates and frees tile-sized numpy arrays (megabytes each) thousands of times, in
several threads. With glibc's defaults (an arena per thread, freed memory trimmed back to
the kernel, arrays above an adaptive threshold mapped on their own) many of them land on
fresh pages that fault again. One arena, arrays below 32 MiB kept in the heap, trimming
only above 1 GiB of free heap and a 64 MiB top pad keep freed memory for the next tile.
On an 8192 px slide (361 tiles of 512 px, 2 workers), against the earlier settings (4
arenas, 1 MiB threshold, 64 MiB trim): 855,000 -> 141,000 minor page faults, 5.3 -> 2.3 s
of kernel time, 48.9 -> 47.1 s wall, peak RSS 651 -> 732 MB (a high-water mark that does
not grow with the slide: ``pipelines/bench_compare.py`` runs two sizes).

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
