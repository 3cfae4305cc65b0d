"""OME-Zarr pyramid writer with a completion record.

Layout: NGFF 0.5 on zarr v3 (levels ``s0, s1, ...``) or NGFF 0.4 on zarr v2 (levels
``0, 1, ...``); axes ``c, y, x``. Level 0 is stored from the lazy refocused array with
zarr chunks equal to its Dask chunks; each further level is a 2x area mean computed from
the level *written* before it, so the model never runs twice.

Completion: the group is created first with ``wsi_deepr.complete = false``; the
multiscales metadata, ``report.json`` and finally ``wsi_deepr.complete = true`` are
written last. A store without that flag is an interrupted run.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np

from wsi_deepr.errors import OptionError, OutputError
from wsi_deepr.refocus import to_dtype

LOG = logging.getLogger("wsi_deepr")

NgffVersion = Literal["0.4", "0.5"]
MIN_LEVEL_PX = 1024
"""The pyramid stops once a level's longer edge is at most this."""
REPORT_NAME = "report.json"

Compute = Callable[[Any], None]
"""Runs a Dask ``store`` (the local scheduler, a distributed client, a progress bar)."""


@dataclass(frozen=True, slots=True)
class Pyramid:
    """What was written."""

    path: Path
    """The store."""
    level_paths: tuple[str, ...]
    """Array paths of the levels inside the store, level 0 first."""
    level_shapes: tuple[tuple[int, int, int], ...]
    """Shapes ``(c, y, x)`` of the levels."""
    level0_s: float
    """Seconds to compute and store level 0 (the model runs here), and level 1 with it."""
    pyramid_s: float
    """Seconds for the further downsampled levels."""


def prepare_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Check that an output store can be created; remove an old one if asked.

    Nothing is changed unless ``overwrite`` and ``path`` holds a zarr store.

    Parameters
    ----------
    path : str or Path
        The output store (a folder).
    overwrite : bool
        Replace an existing zarr store.

    Returns
    -------
    Path
        The absolute output path.

    Raises
    ------
    OutputError
        It exists (without ``overwrite``), is a file, is a folder that is not a zarr
        store, or its parent cannot be written.
    """
    out = Path(path).expanduser().absolute()
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise OutputError(out, "exists and is not a folder")
    if out.exists():
        is_store = (out / "zarr.json").is_file() or (out / ".zgroup").is_file()
        if not overwrite:
            raise OutputError(out, "already exists", hint="pass --overwrite to replace it")
        if not is_store and any(out.iterdir()):
            raise OutputError(out, "is a non-empty folder that is not a zarr store; not replaced")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot create its folder: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(out, f"folder {parent} is not writable")
    return out


def _remove_old(out: Path) -> None:
    if out.exists():
        LOG.info("%s: replacing the existing store (--overwrite)", out)
        try:
            shutil.rmtree(out)
        except OSError as exc:
            raise OutputError(out, f"cannot remove the old store: {exc.strerror}") from exc


def level_shapes(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Shapes of the pyramid levels: halve until the longer edge is <= 1024 px."""
    c, h, w = shape
    shapes = [(c, h, w)]
    while max(h, w) > MIN_LEVEL_PX and min(h, w) >= 2:
        h, w = h // 2, w // 2
        shapes.append((c, h, w))
    return shapes


def write_pyramid(
    level0: da.Array,
    path: str | Path,
    *,
    mpp: float,
    channel_names: tuple[str, ...],
    channel_colors: tuple[str, ...],
    provenance: dict[str, Any],
    ngff: str = "0.5",
    overwrite: bool = False,
    compute: Compute | None = None,
    name: str | None = None,
) -> Pyramid:
    """Store a lazy level 0 and its pyramid as OME-Zarr, marked incomplete until finished.

    Parameters
    ----------
    level0 : dask.array.Array of shape (C, Y, X)
        Regularly chunked along y and x (the zarr chunks equal the first Dask chunks).
    path : str or Path
        Output store, checked by :func:`prepare_output`.
    mpp : float
        Pixel size of level 0 in micrometres.
    channel_names, channel_colors : tuple of str
        One name and one hex colour ``RRGGBB`` per channel.
    provenance : dict
        Stored under the group attribute ``wsi_deepr`` (JSON values).
    ngff : {"0.5", "0.4"}
        NGFF version: 0.5 on zarr v3, 0.4 on zarr v2.
    overwrite : bool
        Replace an existing store.
    compute : callable, optional
        Called with the lazy ``da.store`` result; ``dask.compute`` by default.
    name : str, optional
        Image name in the metadata.

    Returns
    -------
    Pyramid
        Call :func:`mark_complete` after writing the report.
    """
    import zarr

    if ngff not in ("0.4", "0.5"):
        raise OptionError("--ngff", f"must be 0.4 or 0.5, got {ngff!r}")
    out = prepare_output(path, overwrite=overwrite)
    run = compute or (lambda graph: dask.compute(graph))
    n_channels = int(level0.shape[0])
    chunk_y, chunk_x = int(level0.chunks[1][0]), int(level0.chunks[2][0])
    zarr_format: Literal[2, 3] = 3 if ngff == "0.5" else 2
    prefix = "s" if ngff == "0.5" else ""
    shapes = level_shapes(tuple(int(s) for s in level0.shape))  # type: ignore[arg-type]
    try:
        _remove_old(out)
        group = zarr.open_group(str(out), mode="w-", zarr_format=zarr_format)
        group.attrs["wsi_deepr"] = {**provenance, "complete": False}
        # Level 1 is computed from level 0's blocks while they are in memory (no re-read)
        # when every block halves to at least one pixel; the levels below then have
        # chunks half as large, so each stays aligned with the blocks that write it.
        halves = all(n >= 2 for n in (*level0.chunks[1], *level0.chunks[2]))
        from_memory = len(shapes) > 1 and halves and chunk_y % 2 == 0 and chunk_x % 2 == 0
        low_chunks = (chunk_y // 2, chunk_x // 2) if from_memory else (chunk_y, chunk_x)
        arrays: list[Any] = []
        for k, shape in enumerate(shapes):
            arrays.append(
                group.create_array(
                    f"{prefix}{k}",
                    shape=shape,
                    dtype=level0.dtype,
                    chunks=(n_channels, *((chunk_y, chunk_x) if k == 0 else low_chunks)),
                    fill_value=0,
                    **_format_options(zarr_format),
                )
            )
        started = time.perf_counter()
        if from_memory:
            level1 = da.map_blocks(
                _mean2x2,
                level0,
                chunks=(level0.chunks[0], *(tuple(n // 2 for n in c) for c in level0.chunks[1:])),
                dtype=level0.dtype,
                meta=np.empty((0, 0, 0), dtype=level0.dtype),
            )
            run(da.store([level0, level1], arrays[:2], lock=False, compute=False))
        else:
            run(da.store(level0, arrays[0], lock=False, compute=False))
        level0_s = time.perf_counter() - started
        started = time.perf_counter()
        for k in range(2 if from_memory else 1, len(shapes)):
            run(da.store(_downsample(arrays[k - 1], low_chunks), arrays[k],
                         lock=False, compute=False))  # fmt: skip
        pyramid_s = time.perf_counter() - started
        paths = tuple(f"{prefix}{k}" for k in range(len(shapes)))
        _write_multiscales(
            group, ngff=ngff, level_paths=paths, mpp=mpp, name=name or out.stem,
            channel_names=channel_names, channel_colors=channel_colors, dtype=level0.dtype,
        )  # fmt: skip
    except OSError as exc:
        settle_zarr_io()
        raise _output_error(out, exc) from exc
    return Pyramid(out, paths, tuple(shapes), level0_s, pyramid_s)


def _output_error(out: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(out, f"write failed, disk full ({reason}); the store is incomplete")
    return OutputError(out, f"write failed ({reason}); the store is incomplete")


def settle_zarr_io(timeout_s: float = 5.0) -> None:
    """Cancel and wait for zarr's pending I/O tasks after a failed read or write.

    zarr 3 runs its I/O on a background event loop; after an error some tasks stay
    pending and print "Task was destroyed but it is pending!" at interpreter exit.
    """
    try:
        from zarr.core.sync import _get_loop
    except ImportError:
        return
    loop = _get_loop()
    if loop is None or loop.is_closed():
        return

    async def cancel_pending() -> None:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(cancel_pending(), loop).result(timeout_s)
    except Exception as exc:  # best effort on an error path that is already reporting
        LOG.debug("could not settle zarr I/O: %s", exc)


def _format_options(zarr_format: int) -> dict[str, Any]:
    if zarr_format == 3:
        return {"dimension_names": ("c", "y", "x")}
    return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}


def _downsample(source: Any, chunk_yx: tuple[int, int]) -> da.Array:
    """2x area mean of a stored level, chunked like the level it is written to."""
    c, h, w = (int(s) for s in source.shape)
    h2, w2 = h // 2, w // 2
    chunk_y, chunk_x = chunk_yx
    stored = da.from_zarr(source, chunks=(c, 2 * chunk_y, 2 * chunk_x))[:, : 2 * h2, : 2 * w2]
    return stored.map_blocks(
        _mean2x2,
        chunks=(stored.chunks[0], tuple(n // 2 for n in stored.chunks[1]),
                tuple(n // 2 for n in stored.chunks[2])),
        dtype=stored.dtype,
        meta=np.empty((0, 0, 0), dtype=stored.dtype),
    )  # fmt: skip


def _mean2x2(block: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 pixel block, rounded back to the block's dtype (odd edges dropped)."""
    block = block[:, : block.shape[1] // 2 * 2, : block.shape[2] // 2 * 2]
    wide = np.float64 if block.dtype.itemsize > 2 else np.float32
    total: np.ndarray = block[:, 0::2, 0::2].astype(wide)
    total += block[:, 1::2, 0::2]
    total += block[:, 0::2, 1::2]
    total += block[:, 1::2, 1::2]
    total *= 0.25
    return to_dtype(total, block.dtype)


def _write_multiscales(
    group: Any,
    *,
    ngff: str,
    level_paths: tuple[str, ...],
    mpp: float,
    name: str,
    channel_names: tuple[str, ...],
    channel_colors: tuple[str, ...],
    dtype: np.dtype,
) -> None:
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = []
    for k, level_path in enumerate(level_paths):
        size_um = mpp * 2**k
        # A level-k pixel is the mean of 2^k level-0 pixels: its centre sits half a
        # level-k pixel minus half a level-0 pixel from the origin.
        offset_um = mpp * (2**k - 1) / 2
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, size_um, size_um]}]
        if k:
            transforms.append({"type": "translation", "translation": [0.0, offset_um, offset_um]})
        datasets.append({"path": level_path, "coordinateTransformations": transforms})
    multiscale: dict[str, Any] = {"name": name, "axes": axes, "datasets": datasets}
    omero = _omero(channel_names, channel_colors, np.dtype(dtype))
    if ngff == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale], "omero": omero}
    else:
        multiscale = {"version": "0.4", **multiscale}
        group.attrs.update({"multiscales": [multiscale], "omero": {"version": "0.4", **omero}})


def _omero(names: tuple[str, ...], colors: tuple[str, ...], dtype: np.dtype) -> dict[str, Any]:
    if dtype.kind in "ui":
        low, high = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        low, high = 0.0, 1.0
    channels = [
        {
            "label": label,
            "color": color.lstrip("#").upper(),
            "active": True,
            "window": {"min": low, "max": high, "start": low, "end": high},
        }
        for label, color in zip(names, colors, strict=True)
    ]
    return {"channels": channels, "rdefs": {"model": "color"}}


def mark_complete(path: str | Path, report: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Write ``report.json`` and then, last of all, ``wsi_deepr.complete = true``.

    Raises
    ------
    OutputError
        The record cannot be written.
    """
    import zarr

    out = Path(path)
    try:
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        group = zarr.open_group(str(out), mode="r+")
        group.attrs["wsi_deepr"] = {**provenance, "complete": True}
    except OSError as exc:
        settle_zarr_io()
        raise _output_error(out, exc) from exc


def is_complete(path: str | Path) -> bool:
    """Whether a store holds a finished wsi-deepr run (its completion record)."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        record = group.attrs.get("wsi_deepr", {})
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(record, dict):
        return False
    return bool(record.get("complete")) and (Path(path) / REPORT_NAME).is_file()
