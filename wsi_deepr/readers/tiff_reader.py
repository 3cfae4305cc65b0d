"""OME-TIFF and plain TIFF through tifffile, read tile by tile.

Pixels are read by decoding only the tiles (or strips) a requested rectangle touches, with
tifffile's own decoders, synchronously. (tifffile's zarr view would do the same, but zarr
3.1 leaves asyncio tasks pending when a tile fails to decode, which prints tracebacks at
exit; see ``design.md``.) Pyramids stored as SubIFDs or as reduced pages are both used.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsi_deepr.errors import InputError, UnsupportedFormatError
from wsi_deepr.readers.base import (
    RegionSource,
    default_channels,
    guess_modality,
    lazy_level,
    pick_thumbnail,
    resolve_mpp,
    sample_for_modality,
)
from wsi_deepr.readers.tiff_tiles import check_offsets, read_page_region
from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")

SUPPORTED_DTYPES = frozenset(
    np.dtype(t) for t in ("uint8", "uint16", "int16", "uint32", "float32", "float64")
)
_CHANNEL_AXES = frozenset("CIQS")
_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
}

_MALFORMED = (
    tifffile.TiffFileError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    ZeroDivisionError,
    OverflowError,
    RuntimeError,
    OSError,
    struct.error,
)
"""What tifffile raises on malformed files (beyond its own TiffFileError)."""

_OPEN: OrderedDict[tuple[str, int, int], tifffile.TiffFile] = OrderedDict()
MAX_OPEN_FILES = 16
"""Handles kept open per process; the least recently used are dropped (not closed: a
Dask thread may still read through one; it closes when the last reference goes)."""
_OPEN_LOCK = threading.Lock()


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's own warnings while parsing: we raise one clear error instead.

    They still show with ``--debug``.
    """
    tiff_log = logging.getLogger("tifffile")
    before = tiff_log.level
    if not LOG.isEnabledFor(logging.DEBUG):
        tiff_log.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        tiff_log.setLevel(before)


def _tiff(path: str) -> tifffile.TiffFile:
    """The process-wide open handle of a file (reopened when the file changes)."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _OPEN_LOCK:
        tif = _OPEN.get(key)
        if tif is None:
            with _quiet_tifffile():
                tif = tifffile.TiffFile(path)
            # Dask reads tiles from several threads: seek + read must be atomic
            # (tifffile's file lock is a no-op unless switched on).
            tif.filehandle.set_lock(True)
            _OPEN[key] = tif
            while len(_OPEN) > MAX_OPEN_FILES:
                _OPEN.popitem(last=False)
        _OPEN.move_to_end(key)
        return tif


@dataclass(frozen=True, slots=True)
class _Layout:
    """How one level's pages map to channels."""

    n_pages: int
    """Pages (one per leading channel) that make up the level."""
    samples: int
    """Samples per page kept (alpha dropped)."""
    shape: tuple[int, int, int]
    """``(c, y, x)``."""
    dtype: np.dtype


def _layout(path: str, series: Any, level: Any) -> _Layout:
    """Check a level's axes and work out its ``(c, y, x)`` shape."""
    kf = level.keyframe
    page_axes: str = kf.axes
    axes: str = level.axes
    if not axes.endswith(page_axes) or not set(page_axes) <= set("YXS"):
        raise UnsupportedFormatError(path, f"TIFF axes {axes!r} (page {page_axes!r})")
    lead = axes[: len(axes) - len(page_axes)]
    if len(lead) > 1 or (lead and lead not in _CHANNEL_AXES):
        raise UnsupportedFormatError(
            path,
            f"TIFF with axes {axes!r} shape {level.shape}: more than one plane per channel "
            "(z-stack or time series); wsi-deepr reads 2D slides",
        )
    n_pages = int(level.shape[0]) if lead else 1
    if len(level.pages) < n_pages or any(p is None for p in level.pages[:n_pages]):
        raise InputError(path, "TIFF pages of the image are missing (truncated file?)")
    dtype = kf.dtype
    if dtype is None or np.dtype(dtype) not in SUPPORTED_DTYPES:
        raise UnsupportedFormatError(
            path,
            f"pixel type {dtype or f'{kf.bitspersample}-bit'} is not supported "
            "(uint8, uint16, int16, uint32, float32, float64)",
        )
    if kf.photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise UnsupportedFormatError(path, "palette (indexed colour) TIFF is not supported")
    samples = int(kf.samplesperpixel) if "S" in page_axes else 1
    if samples == 4 and kf.photometric == tifffile.PHOTOMETRIC.RGB:
        samples = 3  # RGBA: the alpha channel is dropped
    h, w = int(kf.imagelength), int(kf.imagewidth)
    if h == 0 or w == 0:
        raise InputError(path, f"image has no pixels ({h} x {w})")
    return _Layout(n_pages, samples, (n_pages * samples, h, w), np.dtype(dtype))


class TiffLevelSource(RegionSource):
    """One level of a TIFF series; pickles as file, series and level numbers."""

    def __init__(self, path: str, series_index: int, level_index: int, layout: _Layout):
        self.path = path
        self.series_index = series_index
        self.level_index = level_index
        self.layout = layout
        self.shape = layout.shape
        self.dtype = layout.dtype
        self.label = f"level {level_index}"

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read all channels of rows ``y0:y1`` and columns ``x0:x1`` as ``(c, h, w)``."""
        tif = _tiff(self.path)
        level = tif.series[self.series_index].levels[self.level_index]
        parts = [
            read_page_region(self.path, tif, level.pages[i], self.layout.samples, (y0, y1, x0, x1))
            for i in range(self.layout.n_pages)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _ome_mpp_and_channels(
    tif: tifffile.TiffFile, series_index: int
) -> tuple[float | None, list[str]]:
    """Pixel size (um) and channel names from the OME-XML of one image."""
    xml = tif.ome_metadata
    if not xml:
        return None, []
    try:
        ome = tifffile.xml2dict(xml)["OME"]
    except Exception as exc:  # malformed XML comes in many forms
        LOG.warning("%s: unreadable OME-XML (%s); ignoring it", tif.filehandle.path, exc)
        return None, []
    images = ome.get("Image", [])
    images = images if isinstance(images, list) else [images]
    if not images:
        return None, []
    pixels = images[min(series_index, len(images) - 1)].get("Pixels", {})
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [str(ch.get("Name", "")) for ch in channels if isinstance(ch, dict)]
    size = pixels.get("PhysicalSizeX")
    if size is None:
        return None, names
    factor = _UNIT_TO_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
    try:
        value = float(size)
    except (TypeError, ValueError):
        return math.nan, names
    return (value * factor if factor is not None else math.nan), names


def _tag_mpp(tif: tifffile.TiffFile, page: Any) -> float | None:
    """Pixel size (um) from the resolution tags, or ``None`` when they give no unit."""
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    try:
        num, den = (float(v) for v in tag.value)
        unit = page.tags.get("ResolutionUnit")
        unit_value = int(unit.value) if unit is not None else 2
    except (TypeError, ValueError):
        return math.nan  # malformed tag: reported as an absurd pixel size
    if den == 0 or num == 0:
        return math.nan
    px_per_unit = num / den
    if unit_value == 2:
        return 25400.0 / px_per_unit
    if unit_value == 3:
        return 10000.0 / px_per_unit
    ij = tif.imagej_metadata or {}
    factor = _UNIT_TO_UM.get(str(ij.get("unit", "")).replace("\\u00B5", "µ"))
    if factor is not None:
        return factor / px_per_unit
    return None


def open_tiff(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open an OME-TIFF or plain TIFF lazily.

    Parameters
    ----------
    path : str or Path
        The file.
    mpp : float, optional
        Pixel size in micrometres per pixel; overrides the file's.

    Returns
    -------
    Slide
        Level 0 as a Dask array with 1024-px chunks; the thumbnail from a stored level
        when the file has a pyramid.

    Raises
    ------
    InputError
        When the file is not a readable TIFF, is truncated or holds unsupported pixels.
    MetadataError
        When the pixel size is missing or absurd and ``mpp`` is not given.
    """
    path_str = str(path)
    try:
        return _open_tiff(path_str, mpp)
    except _MALFORMED as exc:
        _forget(path_str)
        # tifffile parses hostile structures lazily and fails in many ways
        raise InputError(path_str, f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    except InputError:
        _forget(path_str)
        raise


def _forget(path: str) -> None:
    """Close and drop the cached handle of a file that turned out unreadable."""
    with _OPEN_LOCK:
        for key in [k for k in _OPEN if k[0] == path]:
            _OPEN.pop(key).close()


def _open_tiff(path_str: str, mpp: float | None) -> Slide:
    tif = _tiff(path_str)
    with _quiet_tifffile():
        all_series = list(tif.series)
        for series in all_series:
            _ = series.levels
    if not all_series:
        raise InputError(path_str, "TIFF holds no image")
    # The largest series is the slide; others are thumbnails, labels or macros.
    sizes = [math.prod(s.shape) if s.shape else 0 for s in all_series]
    series_index = int(np.argmax(sizes))
    series = all_series[series_index]
    file_size = os.path.getsize(path_str)

    sources: list[TiffLevelSource] = []
    for k, level in enumerate(series.levels):
        try:
            layout = _layout(path_str, series, level)
            check_offsets(path_str, list(level.pages[: layout.n_pages]), file_size)
        except (InputError, *_MALFORMED):
            if k == 0:
                raise
            LOG.warning("%s: ignoring unreadable pyramid level %d", path_str, k)
            break
        if k and (layout.shape[0] != sources[0].shape[0] or layout.dtype != sources[0].dtype):
            break
        sources.append(TiffLevelSource(path_str, series_index, k, layout))

    ome_mpp, ome_names = _ome_mpp_and_channels(tif, series_index) if tif.is_ome else (None, [])
    file_mpp = ome_mpp if ome_mpp is not None else _tag_mpp(tif, series.levels[0].keyframe)
    slide_mpp = resolve_mpp(path_str, file_mpp, mpp)

    levels = [lazy_level(src) for src in sources]
    h0, w0 = sources[0].shape[1:]
    downsamples = [0.5 * (h0 / s.shape[1] + w0 / s.shape[2]) for s in sources]
    thumbnail, thumb_ds, stored = pick_thumbnail(levels, downsamples)

    n_channels = sources[0].shape[0]
    kf = series.levels[0].keyframe
    rgb = n_channels == 3 and kf.photometric in (
        tifffile.PHOTOMETRIC.RGB,
        tifffile.PHOTOMETRIC.YCBCR,
    )
    names, colors = default_channels(n_channels, rgb=rgb)
    if len(ome_names) == n_channels and all(ome_names):
        names = tuple(ome_names)
    modality = guess_modality(sample_for_modality(levels[0], thumbnail, stored=stored))
    return Slide(
        path=path_str,
        data=levels[0],
        mpp=slide_mpp,
        channel_names=names,
        channel_colors=colors,
        modality=modality,
        thumbnail=thumbnail,
        thumbnail_downsample=thumb_ds,
        format_name="ome-tiff" if tif.is_ome else "tiff",
        level_shapes=tuple(tuple(int(n) for n in s.shape) for s in sources),
    )
