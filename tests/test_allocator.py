"""glibc malloc tuning: applied where it may be, and it saves page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wsi_deepr.allocator import SETTINGS

CHILD = """
import json, resource, sys, threading
import numpy as np
from wsi_deepr.allocator import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else {}
def work():
    for _ in range(6):  # chunks: a region-sized sum, tile-sized arrays made and dropped
        # (100 per chunk, so their faults, not the region's first touch, dominate)
        acc = np.zeros((3, 2304, 2304), np.float32)
        for k in range(100):
            tile = np.subtract(acc[:, :512, :512], 1.0, dtype=np.float32)
            out = tile * 2.0
            acc[:, :512, :512] += out
            del tile, out
        core = acc[:, :2240, :2240].astype(np.uint8)
        del acc, core
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          env={**clean, **env}, check=True)  # fmt: skip
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuning_is_applied_and_cuts_page_faults_of_tile_sized_arrays():
    tuned, plain = _child("tuned"), _child("plain")
    assert tuned["applied"] == {name: value for name, (_, value) in SETTINGS.items()}
    # untuned, freed tile arrays go back to the kernel and come back as fresh pages
    assert tuned["faults"] < plain["faults"] / 2, (tuned, plain)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_a_setting_the_user_made_is_left_alone():
    tuned = _child("tuned", MALLOC_ARENA_MAX="4")
    assert "MALLOC_ARENA_MAX" not in tuned["applied"]
    assert set(tuned["applied"]) == set(SETTINGS) - {"MALLOC_ARENA_MAX"}
