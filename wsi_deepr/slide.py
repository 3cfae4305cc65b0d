"""The slide value every reader returns and every later stage consumes.

Axis policy, kept everywhere: arrays are ``(c, y, x)``; RGB brightfield has ``c = 3``.
Pixel size is ``mpp`` (micrometres per pixel, isotropic in x and y).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np

Modality = Literal["brightfield", "fluorescence"]


@dataclass(frozen=True, slots=True)
class Slide:
    """A lazily read slide level and what is known about it."""

    path: Path | str
    """The file, store or URL it was read from."""
    data: da.Array
    """Level 0 as a lazy Dask array of shape ``(c, y, x)``; nothing is read until computed."""
    mpp: float
    """Pixel size of level 0 in micrometres per pixel."""
    channel_names: tuple[str, ...]
    """One name per channel, e.g. ``("R", "G", "B")`` or ``("DAPI",)``."""
    channel_colors: tuple[str, ...]
    """One hex colour ``RRGGBB`` per channel, for the OME-Zarr ``omero`` block."""
    modality: Modality
    """``"brightfield"`` (RGB, light background) or ``"fluorescence"`` (dark background)."""
    thumbnail: da.Array
    """A low-resolution level ``(c, y', x')`` for tissue detection and statistics."""
    thumbnail_downsample: float
    """How many level-0 pixels one thumbnail pixel spans along each axis."""
    format_name: str
    """Reader and vendor, e.g. ``"openslide:aperio"``, ``"ome-tiff"``, ``"ome-zarr:0.5"``."""
    level_shapes: tuple[tuple[int, ...], ...] = field(default=())
    """Shapes ``(c, y, x)`` of all levels the file holds, level 0 first."""

    @property
    def dtype(self) -> np.dtype:
        """Pixel data type of level 0 (the output keeps it)."""
        return np.dtype(self.data.dtype)

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Height and width of level 0 in pixels."""
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return int(self.data.shape[0])

    @property
    def area_mm2(self) -> float:
        """Area of level 0 in square millimetres."""
        h, w = self.shape_yx
        return h * w * (self.mpp * 1e-3) ** 2
