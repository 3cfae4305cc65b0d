"""Vendor whole-slide formats through OpenSlide (SVS, NDPI, MRXS, SCN, ...).

OpenSlide returns pre-composited RGBA; pixels outside the scanned area are transparent
and are filled with the slide's background colour (white unless the file says otherwise,
black for fluorescence). openslide-bin ships the C library, so nothing else is needed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide

from wsi_deepr.errors import InputError, UnsupportedFormatError
from wsi_deepr.readers.base import (
    RGB_COLORS,
    RGB_NAMES,
    RegionSource,
    guess_modality,
    lazy_level,
    pick_thumbnail,
    resolve_mpp,
)
from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")

_OPEN: OrderedDict[tuple[str, int, int], openslide.OpenSlide] = OrderedDict()
MAX_OPEN_FILES = 16
"""Handles kept open per process; the least recently used are dropped (not closed: a
Dask thread may still read through one; it closes when the last reference goes)."""
_OPEN_LOCK = threading.Lock()


def detect_vendor(path: str | Path) -> str | None:
    """OpenSlide's name for the file's format (``"aperio"``, ``"hamamatsu"``, ...) or None."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError, ValueError):
        return None


def _handle(path: str) -> openslide.OpenSlide:
    """The process-wide OpenSlide handle of a file (reopened when the file changes)."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _OPEN_LOCK:
        handle = _OPEN.get(key)
        if handle is None:
            handle = openslide.OpenSlide(path)
            _OPEN[key] = handle
            while len(_OPEN) > MAX_OPEN_FILES:
                _OPEN.popitem(last=False)
        _OPEN.move_to_end(key)
        return handle


def _forget(path: str, handle: openslide.OpenSlide) -> None:
    with _OPEN_LOCK:
        for key in [k for k, v in _OPEN.items() if k[0] == path and v is handle]:
            del _OPEN[key]


def _background_rgb(handle: openslide.OpenSlide) -> tuple[int, int, int] | None:
    """The background colour the file declares (``openslide.background-color``)."""
    value = handle.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
    if not value or len(value) != 6:
        return None
    try:
        return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))
    except ValueError:
        return None


def composite(rgba_yx4: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite OpenSlide's RGBA (not premultiplied) onto a background as ``(3, h, w)``."""
    rgb = rgba_yx4[..., :3]
    alpha = rgba_yx4[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    a = alpha.astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return np.moveaxis(np.round(out).astype(np.uint8), -1, 0)


class OpenSlideLevelSource(RegionSource):
    """One OpenSlide level; pickles as path, level and background colour."""

    def __init__(
        self,
        path: str,
        level: int,
        shape_yx: tuple[int, int],
        downsample: float,
        background: tuple[int, int, int],
    ) -> None:
        self.path = path
        self.level = level
        self.shape = (3, shape_yx[0], shape_yx[1])
        self.dtype = np.dtype(np.uint8)
        self.downsample = downsample
        self.background = background
        self.label = f"level {level}"

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read rows ``y0:y1`` and columns ``x0:x1`` of this level as ``(3, h, w)``."""
        handle = _handle(self.path)
        # read_region takes the top-left corner in level-0 pixels.
        location = (round(x0 * self.downsample), round(y0 * self.downsample))
        try:
            image = handle.read_region(location, self.level, (x1 - x0, y1 - y0))
        except openslide.OpenSlideError:
            # An OpenSlide handle fails every later read once one has failed: drop it so
            # other regions are read through a fresh one. (Not closed: other threads may
            # still use it; it closes when the last reference goes.)
            _forget(self.path, handle)
            raise
        return composite(np.asarray(image), self.background)


def _modality_sample(
    path: str, handle: openslide.OpenSlide, dims: list[tuple[int, int]], downsamples: list[float]
) -> np.ndarray:
    """Opaque pixels ``(3, 1, n)`` of the smallest level: all of it when it is small,
    otherwise nine 256-px patches spread over it (a single-level slide stays cheap)."""
    level = len(dims) - 1
    w, h = dims[level]
    if w * h <= 4_000_000:
        boxes = [(0, 0, w, h)]
    else:
        patch = 256
        boxes = [
            (min(int(fx * w), max(0, w - patch)), min(int(fy * h), max(0, h - patch)), patch, patch)
            for fy in (0.1, 0.45, 0.8)
            for fx in (0.1, 0.45, 0.8)
        ]
    pixels = []
    for x0, y0, bw, bh in boxes:
        location = (round(x0 * downsamples[level]), round(y0 * downsamples[level]))
        try:
            rgba = np.asarray(handle.read_region(location, level, (bw, bh)))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise InputError(path, f"cannot read level {level}: {exc}") from exc
        rgba = rgba.reshape(-1, 4)
        pixels.append(rgba[rgba[:, 3] > 0, :3])
    opaque = np.concatenate(pixels)
    return np.ascontiguousarray(opaque.T)[:, None, :]


def open_openslide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide OpenSlide can read, lazily.

    Parameters
    ----------
    path : str or Path
        The slide file (for MRXS, the ``.mrxs`` file beside its data folder).
    mpp : float, optional
        Pixel size in micrometres per pixel; overrides ``openslide.mpp-x``.

    Returns
    -------
    Slide
        RGB ``uint8`` level 0 with 1024-px chunks, the thumbnail from a stored level.

    Raises
    ------
    InputError
        When OpenSlide cannot open the file.
    MetadataError
        When the pixel size is missing or absurd and ``mpp`` is not given.
    """
    path_str = str(path)
    vendor = detect_vendor(path_str)
    if vendor is None:
        raise UnsupportedFormatError(path_str, "not a format OpenSlide recognises")
    try:
        handle = _handle(path_str)
        dims = list(handle.level_dimensions)
        downsamples = [float(d) for d in handle.level_downsamples]
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise InputError(path_str, f"OpenSlide cannot open it ({vendor}): {exc}") from exc
    if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
        raise InputError(path_str, "slide has no pixels")

    raw_mpp = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
    try:
        file_mpp = float(raw_mpp) if raw_mpp is not None else None
    except ValueError:
        file_mpp = math.nan
    slide_mpp = resolve_mpp(path_str, file_mpp, mpp)

    modality = guess_modality(_modality_sample(path_str, handle, dims, downsamples))
    declared = _background_rgb(handle)
    if declared is not None:
        background = declared
    else:
        background = (0, 0, 0) if modality == "fluorescence" else (255, 255, 255)

    sources = [
        OpenSlideLevelSource(path_str, k, (h, w), downsamples[k], background)
        for k, (w, h) in enumerate(dims)
    ]
    levels = [lazy_level(src) for src in sources]
    thumbnail, thumb_ds, _ = pick_thumbnail(levels, downsamples)
    return Slide(
        path=path_str,
        data=levels[0],
        mpp=slide_mpp,
        channel_names=RGB_NAMES,
        channel_colors=RGB_COLORS,
        modality=modality,
        thumbnail=thumbnail,
        thumbnail_downsample=thumb_ds,
        format_name=f"openslide:{vendor}",
        level_shapes=tuple((3, h, w) for (w, h) in dims),
    )
