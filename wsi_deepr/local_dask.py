"""Dask's local schedulers, passed as functions.

A scheduler given by name (``"threads"``, ``"sync"``) or left to dask's default makes dask
look for a ``distributed`` client first, which imports ``distributed``: about 0.5 s at the
start of every command, cluster or not. Reading slides and computing their small
summaries happens in this process, so those calls name a local scheduler as a function;
only :mod:`wsi_deepr.run` and :mod:`wsi_deepr.batch` hand work to a cluster, explicitly.
"""

from __future__ import annotations

import dask.local
import dask.threaded

THREADS = dask.threaded.get
"""Dask's thread-pool scheduler (accepts ``num_workers``)."""
SYNC = dask.local.get_sync
"""Dask's single-threaded scheduler."""
