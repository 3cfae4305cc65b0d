"""One GPU per Dask worker: a worker preload that sets ``CUDA_VISIBLE_DEVICES``.

ONNX Runtime's CUDA provider uses device 0 of what the process sees, so several workers on
one machine would all share the first GPU. Loaded as a worker preload, this module gives
worker ``k`` of a machine the ``k``-th GPU (round robin) before anything initialises
CUDA: sessions are created lazily, on a worker's first task (:mod:`wsi_deepr.inference`),
and worker processes are spawned, never forked from a parent that touched CUDA.

    dask worker tcp://scheduler:8786 --nworkers 4 --nthreads 1 --name gpu \\
        --preload wsi_deepr.gpu_pinning

The worker index is the number a worker's name ends with (``gpu-0``, ``gpu-1`` from
``--name gpu --nworkers 4``; ``0, 1, ...`` in a ``LocalCluster``). The GPUs are those of
``WSI_DEEPR_GPUS`` (e.g. ``0,1,2,3``), else of ``CUDA_VISIBLE_DEVICES``, else those
``nvidia-smi -L`` lists. A worker whose name has no index, or a machine without GPUs, is
left as it is. ``dask cuda worker`` (dask-cuda) pins GPUs itself and needs no preload.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from typing import Any

LOG = logging.getLogger("wsi_deepr")

_INDEX = re.compile(r"(?:^|\D)(\d+)$")


def worker_index(name: object) -> int | None:
    """The number a worker's name ends with (``"gpu-3" -> 3``, ``2 -> 2``), else ``None``."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    match = _INDEX.search(str(name))
    return int(match[1]) if match else None


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """GPU ids this machine offers: ``WSI_DEEPR_GPUS``, ``CUDA_VISIBLE_DEVICES`` or nvidia-smi."""
    env = os.environ if environ is None else environ
    for key in ("WSI_DEEPR_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(key, "").strip()
        if value:
            return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1"]
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(k) for k, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def gpu_for_worker(name: object, gpus: list[str]) -> str | None:
    """The GPU id of a worker: the ``index``-th of ``gpus``, round robin; ``None`` if unknown.

    Parameters
    ----------
    name : object
        The worker's name.
    gpus : list of str
        GPU ids (:func:`visible_gpus`).

    Returns
    -------
    str or None
    """
    index = worker_index(name)
    if index is None or not gpus:
        return None
    return gpus[index % len(gpus)]


def dask_setup(worker: Any) -> None:
    """Worker preload hook: pin this worker process to its GPU (before CUDA starts)."""
    gpu = gpu_for_worker(worker.name, visible_gpus())
    if gpu is None:
        LOG.info("worker %s: no GPU index from its name; CUDA_VISIBLE_DEVICES unchanged",
                 worker.name)  # fmt: skip
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    LOG.info("worker %s: CUDA_VISIBLE_DEVICES=%s", worker.name, gpu)
