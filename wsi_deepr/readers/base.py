"""What every reader shares: pixel-size checks, lazy region arrays, thumbnails, modality.

A reader describes one pyramid level as a :class:`RegionSource` (a small, picklable
object that reads a ``(c, h, w)`` rectangle on demand) and turns it into a Dask array with
:func:`lazy_level`. Failures while reading pixels are raised as
:class:`~wsi_deepr.errors.InputError` naming the file and the rectangle, so an error found
at compute time reads like one found when opening.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from wsi_deepr.errors import InputError, MetadataError, OptionError
from wsi_deepr.local_dask import THREADS
from wsi_deepr.slide import Modality

LOG = logging.getLogger("wsi_deepr")

MPP_MIN_UM = 0.05
"""Smallest credible pixel size (micrometres per pixel)."""
MPP_MAX_UM = 100.0
"""Largest credible pixel size (micrometres per pixel)."""
CHUNK_PX = 1024
"""Edge of level-0 Dask chunks in y and x."""
MAX_FLOAT_VALUE = float(np.finfo(np.float32).max) / 16
"""Largest pixel magnitude the float32 model path takes with room for normalising and
blending (float64 slides can hold more)."""
THUMBNAIL_MAX_PX = 2048
"""Longest side of the thumbnail used for tissue detection and statistics."""

RGB_NAMES = ("R", "G", "B")
RGB_COLORS = ("FF0000", "00FF00", "0000FF")
_FLUO_COLORS = ("0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF")


def check_user_mpp(mpp: float | None) -> float | None:
    """Validate a pixel size given by the user (``--mpp``).

    Parameters
    ----------
    mpp : float or None
        Micrometres per pixel, or ``None`` when not given.

    Returns
    -------
    float or None
        The same value.

    Raises
    ------
    OptionError
        When the value is not finite or lies outside 0.05..100 um/px.
    """
    if mpp is None:
        return None
    if not math.isfinite(mpp) or not MPP_MIN_UM <= mpp <= MPP_MAX_UM:
        raise OptionError(
            "--mpp",
            f"{mpp} um/px is not a credible pixel size",
            hint=f"expected {MPP_MIN_UM}..{MPP_MAX_UM} micrometres per pixel",
        )
    return float(mpp)


def resolve_mpp(path: str | Path, file_mpp: float | None, user_mpp: float | None) -> float:
    """Pick the pixel size: the user's when given, else the file's if it is credible.

    Parameters
    ----------
    path : str or Path
        The slide, named in the error.
    file_mpp : float or None
        Pixel size found in the file's metadata (micrometres per pixel), if any.
    user_mpp : float or None
        Pixel size given with ``--mpp``; overrides the file.

    Returns
    -------
    float
        Micrometres per pixel.

    Raises
    ------
    MetadataError
        When no pixel size is given and the file's is missing or absurd.
    OptionError
        When the user's value is absurd.
    """
    user_mpp = check_user_mpp(user_mpp)
    if user_mpp is not None:
        if file_mpp is not None and math.isfinite(file_mpp) and file_mpp > 0:
            if abs(file_mpp - user_mpp) > 0.01 * user_mpp:
                LOG.info("%s: --mpp %g overrides the file's %g um/px", path, user_mpp, file_mpp)
        return user_mpp
    if file_mpp is None:
        raise MetadataError(path, "no pixel size in the file", hint="pass --mpp")
    if not math.isfinite(file_mpp) or not MPP_MIN_UM <= file_mpp <= MPP_MAX_UM:
        raise MetadataError(
            path,
            f"pixel size in the file is {file_mpp:g} um/px, outside {MPP_MIN_UM}..{MPP_MAX_UM}",
            hint="pass --mpp",
        )
    return float(file_mpp)


def default_channels(n_channels: int, *, rgb: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Channel names and hex colours when the file names none."""
    if rgb and n_channels == 3:
        return RGB_NAMES, RGB_COLORS
    if n_channels == 1:
        return ("C0",), ("FFFFFF",)
    names = tuple(f"C{i}" for i in range(n_channels))
    colors = tuple(_FLUO_COLORS[i % len(_FLUO_COLORS)] for i in range(n_channels))
    return names, colors


class RegionSource(ABC):
    """One level of one file, read a rectangle at a time.

    Subclasses set :attr:`path`, :attr:`shape` ``(c, y, x)`` and :attr:`dtype`, implement
    :meth:`read`, and must pickle without open file handles (reopen on demand) so a
    graph can travel to ``dask.distributed`` workers.
    """

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    label: str = "level 0"

    @property
    def ndim(self) -> int:
        """Always 3: ``(c, y, x)``."""
        return 3

    @abstractmethod
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read all channels of rows ``y0:y1`` and columns ``x0:x1`` as ``(c, h, w)``."""

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        cs, ys, xs = key
        c = self.shape[0]
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        region = f"{self.label}, rows {y0}:{y1}, columns {x0}:{x1}"
        try:
            block = self.read(y0, y1, x0, x1)
        except InputError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise many unrelated types; name the file
            raise InputError(self.path, f"cannot read pixels at {region}: {exc}") from exc
        expected = (c, y1 - y0, x1 - x0)
        if block.shape != expected:
            raise InputError(
                self.path, f"pixels at {region} have shape {block.shape}, expected {expected}"
            )
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise InputError(self.path, f"NaN or infinite pixel values at {region}")
        if block.dtype.kind == "f" and block.dtype.itemsize > 4 and block.size:
            peak = float(np.abs(block).max())
            if peak > MAX_FLOAT_VALUE:
                raise InputError(
                    self.path,
                    f"pixel values at {region} reach {peak:.3g}; the model works in float32 "
                    f"and takes values up to {MAX_FLOAT_VALUE:.1e}",
                    hint="rescale the image",
                )
        return np.ascontiguousarray(block[cs], dtype=self.dtype)


def _file_stamp(path: str) -> tuple[int, int]:
    """Modification time and size of a local file (or store folder), so a rewritten
    file never shares Dask names (or cached thumbnails) with its earlier version."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return (0, 0)  # a URL
    return (stat.st_mtime_ns, stat.st_size)


def lazy_level(source: RegionSource, *, chunk_px: int = CHUNK_PX) -> da.Array:
    """Wrap a region source as a Dask array with ``(c, chunk_px, chunk_px)`` chunks.

    Parameters
    ----------
    source : RegionSource
        The level to read.
    chunk_px : int
        Chunk edge in y and x; all channels go into one chunk.

    Returns
    -------
    dask.array.Array of shape (C, Y, X)
        Nothing is read until a chunk is computed.
    """
    c = source.shape[0]
    name = "read-" + tokenize(
        type(source).__name__, source.path, _file_stamp(source.path), source.label, source.shape
    )
    return da.from_array(
        source,
        chunks=(c, chunk_px, chunk_px),
        name=name,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=source.dtype),
    )


def region_source(data: object) -> RegionSource | None:
    """The :class:`RegionSource` that ``data`` reads, when it is a :func:`lazy_level` array.

    A region read from the source directly decodes each file tile once; through the
    array's 1024-px chunks a region decodes every chunk it touches in full and copies
    the pieces together (twice the decoding for a 2048-px region off the chunk grid).

    Parameters
    ----------
    data : object
        A level as returned by a reader, or anything else (then ``None``).

    Returns
    -------
    RegionSource or None
    """
    name = getattr(data, "name", None)
    graph = getattr(data, "dask", None)
    if not isinstance(name, str) or not name.startswith("read-") or graph is None:
        return None
    # da.from_array keeps the wrapped object under "original-<name>"
    layer = getattr(graph, "layers", {}).get("original-" + name)
    source = layer.get("original-" + name) if layer is not None else None
    return source if isinstance(source, RegionSource) else None


def pick_thumbnail(
    levels: list[da.Array], downsamples: list[float], *, max_px: int = THUMBNAIL_MAX_PX
) -> tuple[da.Array, float, bool]:
    """Choose a low-resolution level for masks and statistics, downsampling lazily.

    Takes the largest existing level whose long side is at most ``max_px``; when every
    level is larger, the smallest is reduced further by block means (with Dask).

    Parameters
    ----------
    levels : list of dask.array.Array of shape (C, Y, X)
        The file's levels, level 0 first.
    downsamples : list of float
        Level-0 pixels per pixel of each level.
    max_px : int
        Longest side allowed.

    Returns
    -------
    thumbnail : dask.array.Array of shape (C, Y', X')
    downsample : float
        Level-0 pixels per thumbnail pixel.
    stored : bool
        Whether the thumbnail is a level stored in the file (cheap to read).
    """
    for level, factor in zip(levels, downsamples, strict=True):
        if max(level.shape[1:]) <= max_px:
            return level, float(factor), True
    smallest, factor = levels[-1], float(downsamples[-1])
    reduce_by = 1
    while max(smallest.shape[1:]) / reduce_by > max_px:
        reduce_by *= 2
    return block_mean(smallest, reduce_by), factor * reduce_by, False


def block_mean(level: da.Array, factor: int) -> da.Array:
    """Reduce height and width ``factor`` times by block means, lazily, keeping the dtype.

    Axes shorter than ``factor`` are reduced by their whole length (never to zero).
    """
    _, h, w = level.shape
    fy, fx = max(1, min(factor, h)), max(1, min(factor, w))
    trimmed = level[:, : (h // fy) * fy, : (w // fx) * fx]
    # Chunks must be multiples of the factor; 1024-px chunks are for powers of two <= 1024.
    cy = max(fy, (CHUNK_PX // fy) * fy)
    cx = max(fx, (CHUNK_PX // fx) * fx)
    trimmed = trimmed.rechunk((level.shape[0], cy, cx))
    reduced = da.coarsen(np.mean, trimmed, {1: fy, 2: fx}, trim_excess=True, dtype=np.float64)
    if level.dtype.kind in "iub":
        return da.round(reduced).astype(level.dtype)
    return reduced.astype(level.dtype)


def guess_modality(sample_cyx: np.ndarray) -> Modality:
    """Brightfield when the background is light, fluorescence when it is dark.

    Parameters
    ----------
    sample_cyx : ndarray of shape (C, Y, X)
        A low-resolution view of the whole slide (or spread-out samples of it).

    Returns
    -------
    {"brightfield", "fluorescence"}
    """
    if sample_cyx.size == 0:
        return "brightfield"
    brightness = np.asarray(sample_cyx, dtype=np.float64).max(axis=0)
    brightness = brightness[np.isfinite(brightness)]
    if brightness.size == 0:
        return "brightfield"
    top = float(np.percentile(brightness, 99.9))
    median = float(np.median(brightness))
    if top <= 0:
        return "fluorescence"
    dtype = np.dtype(sample_cyx.dtype)
    if dtype.kind in "iu":
        # A light background is also bright in absolute terms: a quarter of 8-bit full
        # scale, or of 12-bit for wider integers (12-bit cameras in 16-bit files are common;
        # fluorescence camera offsets stay far below that).
        floor = 0.25 * (255.0 if dtype.itemsize == 1 else 4095.0)
        if median < floor:
            return "fluorescence"
    # Light background: most pixels (the median) are near the brightest ones.
    return "brightfield" if median >= 0.5 * top else "fluorescence"


def sample_for_modality(level0: da.Array, thumbnail: da.Array, *, stored: bool) -> np.ndarray:
    """Pixels to judge the background by, read cheaply.

    The thumbnail when it is an existing small level (or level 0 is small); otherwise
    nine 256-px patches spread over level 0, so opening a big single-level file stays fast.
    """
    if stored:
        return np.asarray(thumbnail.compute(scheduler=THREADS))
    _, h, w = level0.shape
    if h * w <= 4_000_000:
        return np.asarray(level0.compute(scheduler=THREADS))
    patch = 256
    patches = []
    for fy in (0.1, 0.5, 0.9):
        for fx in (0.1, 0.5, 0.9):
            y0 = min(max(0, int(fy * h) - patch // 2), max(0, h - patch))
            x0 = min(max(0, int(fx * w) - patch // 2), max(0, w - patch))
            patches.append(level0[:, y0 : y0 + patch, x0 : x0 + patch].reshape(level0.shape[0], -1))
    return np.asarray(da.concatenate(patches, axis=1).compute(scheduler=THREADS))[:, None, :]
