"""Where tiles go on a slide level, and how their outputs are blended.

Tiles of ``tile_px`` overlap by at least ``overlap_px``; their outputs are merged with
weights that form an exact partition of unity: at every pixel the weights of all tiles
covering it sum to exactly 1 in float32. Each weight is a separable product of two 1-D
weights, and the 1-D weights are dyadic rationals with 12 fractional bits, so the
products (24 bits) and their sums are exact in float32. An identity model therefore
reproduces its input up to the rounding of ``x * w`` alone, which the conversion back to
an integer dtype (``rint``) removes.

Along each axis a tile's raw weight is 1 in its core, 0 in a margin of ``overlap_px // 4``
at an edge facing a neighbour (model outputs near a tile edge are the least reliable),
and a raised-cosine ramp between. An edge at the slide boundary gets no ramp. The raw
weights are divided by their sum, which keeps the sum at one wherever three tiles overlap
(short axes, where the last tile is shifted back to end on the slide edge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_deepr.errors import OptionError

WEIGHT_BITS = 12
"""Fractional bits of the 1-D blending weights (products need 2 x 12 <= 24 bits)."""
MAX_TILE_PX = 8192
"""Largest tile edge: one 3-channel float32 tile of 8192 px already takes 805 MB, and a
chunk task holds several such buffers."""


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Tile size and overlap along both axes of a slide level."""

    tile_px: int
    """Edge of one model input, in pixels."""
    overlap_px: int
    """Minimum overlap of neighbouring tiles, in pixels (``< tile_px / 2``)."""

    def __post_init__(self) -> None:
        if self.tile_px < 1:
            raise OptionError("--tile-px", f"must be at least 1, got {self.tile_px}")
        if self.tile_px > MAX_TILE_PX:
            tile_gb = 3 * 4 * self.tile_px**2 / 1e9
            raise OptionError(
                "--tile-px",
                f"{self.tile_px} px is above the largest tile of {MAX_TILE_PX} px "
                f"(one RGB tile would take {tile_gb:.1f} GB in float32)",
            )
        if self.overlap_px < 0:
            raise OptionError("--overlap-px", f"must be >= 0, got {self.overlap_px}")
        if 2 * self.overlap_px >= self.tile_px:
            raise OptionError(
                "--overlap-px",
                f"{self.overlap_px} px must be less than half the tile ({self.tile_px} px)",
            )

    @property
    def stride_px(self) -> int:
        """Distance between the origins of neighbouring tiles (except the last one)."""
        return self.tile_px - self.overlap_px

    @property
    def margin_px(self) -> int:
        """Pixels at a tile edge facing a neighbour that get zero weight."""
        return self.overlap_px // 4

    def check_model(self, *, min_tile_px: int) -> None:
        """Reject a tile smaller than the network accepts.

        Parameters
        ----------
        min_tile_px : int
            The smallest input edge the model gives sensible output for.

        Raises
        ------
        OptionError
            If ``tile_px < min_tile_px``.
        """
        if self.tile_px < min_tile_px:
            raise OptionError(
                "--tile-px",
                f"{self.tile_px} px is below the model's minimum of {min_tile_px} px",
            )

    def tile_len(self, extent_px: int) -> int:
        """Edge of the tiles along an axis of ``extent_px`` (shorter if the axis is)."""
        return min(self.tile_px, extent_px)

    def fitted(self, shape_yx: tuple[int, int], *, multiple_px: int = 16) -> TileGrid:
        """The smallest grid with as many tiles as this one on a slide of ``shape_yx``.

        The last tile along an axis is shifted back to end on the slide edge, so where the
        axis is not a whole number of strides the tiles overlap more than they must. The
        same number of tiles, shrunk until they meet the minimum overlap along the
        tighter axis, covers the slide with less model work: on a 2967 x 2220 px slide
        1024 px tiles become 800 px ones (12 tiles either way, 39% fewer pixels).

        Parameters
        ----------
        shape_yx : tuple of int
            Slide height and width in pixels.
        multiple_px : int
            The tile edge is rounded up to a multiple of this (convolution-friendly sizes),
            never beyond :attr:`tile_px`.

        Returns
        -------
        TileGrid
            Same overlap, ``tile_px`` at most this grid's.

        Examples
        --------
        >>> TileGrid(1024, 64).fitted((2967, 2220)).tile_px
        800
        """
        needed = 2 * self.overlap_px + 1  # the smallest tile this overlap allows
        for extent in shape_yx:
            n = len(self.origins(extent))
            if n > 1:  # n tiles of t cover n * t - (n - 1) * overlap pixels
                needed = max(needed, math.ceil((extent + (n - 1) * self.overlap_px) / n))
        tile_px = min(self.tile_px, multiple_px * math.ceil(needed / multiple_px))
        if tile_px < self.tile_px and all(
            len(TileGrid(tile_px, self.overlap_px).origins(e)) == len(self.origins(e))
            for e in shape_yx
        ):
            return TileGrid(tile_px, self.overlap_px)
        return self

    def origins(self, extent_px: int) -> np.ndarray:
        """Tile origins covering ``[0, extent_px)`` along one axis.

        Origins step by :attr:`stride_px`; the last tile is shifted back so that it ends
        exactly on the edge, so every tile lies inside the slide.

        Parameters
        ----------
        extent_px : int
            Length of the axis in pixels (>= 1).

        Returns
        -------
        ndarray of shape (n,), int64
            Increasing origins; ``origins[-1] + tile_len(extent_px) == extent_px``.

        Examples
        --------
        >>> TileGrid(512, 64).origins(1000).tolist()
        [0, 448, 488]
        """
        if extent_px < 1:
            raise ValueError(f"extent must be >= 1 px, got {extent_px}")
        if extent_px <= self.tile_px:
            return np.zeros(1, dtype=np.int64)
        n = 1 + math.ceil((extent_px - self.tile_px) / self.stride_px)
        origins = np.arange(n, dtype=np.int64) * self.stride_px
        origins[-1] = extent_px - self.tile_px
        return origins

    def weights(self, extent_px: int) -> np.ndarray:
        """1-D blending weights of every tile along one axis.

        Parameters
        ----------
        extent_px : int
            Length of the axis in pixels.

        Returns
        -------
        ndarray of shape (n, tile_len), float32
            Row ``k`` weighs the output of the tile at ``origins(extent_px)[k]``. Summed
            over tiles at each pixel of the axis the weights are exactly 1.
        """
        origins = self.origins(extent_px)
        tile_len = self.tile_len(extent_px)
        n = len(origins)
        raw = np.ones((n, tile_len), dtype=np.float64)
        for k in range(n):
            if k > 0:
                raw[k] *= _edge_ramp(tile_len, self.overlap_px, self.margin_px)
            if k < n - 1:
                raw[k] *= _edge_ramp(tile_len, self.overlap_px, self.margin_px)[::-1]
        total = np.zeros(extent_px, dtype=np.float64)
        for k, origin in enumerate(origins):
            total[origin : origin + tile_len] += raw[k]
        scale = float(1 << WEIGHT_BITS)
        quantised = np.floor(raw / np.stack([total[o : o + tile_len] for o in origins]) * scale)
        # Give each pixel's rounding deficit to the tile with the largest weight there, so
        # the integer weights sum to exactly 2**WEIGHT_BITS.
        owner = np.full(extent_px, -1, dtype=np.int64)
        best = np.full(extent_px, -1.0)
        acc = np.zeros(extent_px, dtype=np.float64)
        for k, origin in enumerate(origins):
            span = slice(origin, origin + tile_len)
            acc[span] += quantised[k]
            better = quantised[k] > best[span]
            owner[span][better] = k
            best[span][better] = quantised[k][better]
        deficit = scale - acc
        for k, origin in enumerate(origins):
            mine = owner[origin : origin + tile_len] == k
            quantised[k][mine] += deficit[origin : origin + tile_len][mine]
        return (quantised / scale).astype(np.float32)


def _edge_ramp(tile_len: int, overlap_px: int, margin_px: int) -> np.ndarray:
    """Raw weight rising from 0 at the leading edge to 1 after ``overlap_px - margin_px``."""
    ramp = np.ones(tile_len, dtype=np.float64)
    rise_px = overlap_px - 2 * margin_px
    if overlap_px == 0:
        return ramp
    t = np.arange(tile_len, dtype=np.float64)
    rising = np.sin(0.5 * np.pi * (t - margin_px + 0.5) / max(rise_px, 1)) ** 2
    ramp = np.where(t < margin_px, 0.0, np.where(t < margin_px + rise_px, rising, 1.0))
    return ramp


def crop_ramp(grid: TileGrid, start: int, end: int, tile_len: int) -> np.ndarray:
    """1-D weight of a tile crop's model output against the tile's own input.

    Along each axis of a crop ``[start, end)`` of a tile of ``tile_len``: 0 at an edge
    inside the tile (the model saw nothing beyond it), rising as a tile's edge does
    (:func:`_edge_ramp`: a margin of ``overlap_px // 4``, then a raised cosine) to 1;
    an edge on the tile's own edge gets no ramp (the tile's blending weight has one).
    The tile's output is ``input + ramp_y ramp_x (model - input)`` on the crop, its input
    elsewhere: the same seamless transition as between a refocused and a skipped tile.

    Returns
    -------
    ndarray of shape (end - start,), float32
    """
    length = end - start
    ramp = np.ones(length, dtype=np.float64)
    if start > 0:
        ramp *= _edge_ramp(length, grid.overlap_px, grid.margin_px)
    if end < tile_len:
        ramp *= _edge_ramp(length, grid.overlap_px, grid.margin_px)[::-1]
    return ramp.astype(np.float32)


def cell_mask_weight(cells: np.ndarray, cell_px: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A cell mask as a smooth weight over a pixel box.

    The mask spread to pixels, averaged over a ``cell_px`` square centred on each pixel:
    1 from half a cell inside the cells' edge, 0 from half a cell outside it, linear
    between, so the model's output fades into the input over one cell (16 um) around a
    refocused region rather than at a tile's rectangle. The average is separable and the
    mask constant per cell, so along each axis a pixel's value mixes the two cells its
    window straddles, in proportion to its share in each (no matrix product: BLAS threads
    would contend with the model's).

    Parameters
    ----------
    cells : ndarray of bool, shape (ny, nx)
        Cell ``(i, j)`` covers pixels ``[i, i + 1) x [j, j + 1)`` times ``cell_px``.
    cell_px : int
        Edge of one cell in pixels.
    box : tuple of int
        ``(y0, y1, x0, x1)`` in the cells' pixel grid (may reach past it: zeros there).

    Returns
    -------
    ndarray of shape (y1 - y0, x1 - x0), float32
    """
    y0, y1, x0, x1 = box
    ny, nx = cells.shape

    def straddled(p0: int, p1: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        # the window [p + 1/2 - cell/2, p + 1/2 + cell/2) covers cells k and k + 1, with a
        # share `after` in k + 1; k is clipped where both cells lie past the mask (zeros)
        start = (np.arange(p0, p1, dtype=np.float64) + 0.5 - cell_px / 2) / cell_px
        first = np.floor(start)
        after = (start - first).astype(np.float32)
        return np.clip(first.astype(np.int64), -2, n), after

    ky, after_y = straddled(y0, y1, ny)
    kx, after_x = straddled(x0, x1, nx)
    # the mask with two cells of zeros around it, cut to the cells the box needs
    ry0, ry1, rx0, rx1 = int(ky.min()), int(ky.max()) + 2, int(kx.min()), int(kx.max()) + 2
    padded = np.zeros((ry1 - ry0, rx1 - rx0), dtype=np.float32)
    sy0, sy1, sx0, sx1 = max(ry0, 0), min(ry1, ny), max(rx0, 0), min(rx1, nx)
    if sy1 > sy0 and sx1 > sx0:
        padded[sy0 - ry0 : sy1 - ry0, sx0 - rx0 : sx1 - rx0] = cells[sy0:sy1, sx0:sx1]
    if not padded.any():
        return np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    iy, ix = ky - ry0, kx - rx0
    if padded[iy.min() : iy.max() + 2, ix.min() : ix.max() + 2].all():
        return np.ones((y1 - y0, x1 - x0), dtype=np.float32)
    rows = padded[iy] * (1 - after_y)[:, None]
    rows += padded[iy + 1] * after_y[:, None]
    out = rows[:, ix] * (1 - after_x)[None, :]
    out += rows[:, ix + 1] * after_x[None, :]
    return out


@dataclass(frozen=True, slots=True)
class TilePlan:
    """All tiles of one slide level, their weights and whether each touches tissue."""

    grid: TileGrid
    """Tile size and overlap."""
    shape_yx: tuple[int, int]
    """Height and width of the level in pixels."""
    origins_y: np.ndarray
    """Row origins of the tile rows, shape ``(ny,)``."""
    origins_x: np.ndarray
    """Column origins of the tile columns, shape ``(nx,)``."""
    weights_y: np.ndarray
    """1-D weights of the tile rows, shape ``(ny, tile_h)``."""
    weights_x: np.ndarray
    """1-D weights of the tile columns, shape ``(nx, tile_w)``."""
    tissue: np.ndarray
    """``(ny, nx)`` bool: the tile touches tissue and goes through the model."""
    crops: np.ndarray | None = None
    """``(ny, nx, 4)`` int64 ``(y0, y1, x0, x1)`` in tile coordinates: the part of each
    model tile that goes through the model (``--only-blurred``, :func:`crop_ramp`); the
    rest of the tile passes its input through. ``None``: whole tiles."""
    cells: np.ndarray | None = None
    """``(ny_cells, nx_cells)`` bool on a grid of ``cell_px`` from level 0's origin: the
    model's output is used only near these cells (:func:`cell_mask_weight`), the input
    elsewhere (``--only-blurred``). ``None``: everywhere the model runs."""
    cell_px: int = 0
    """Edge of one cell of ``cells`` in level-0 pixels."""

    @property
    def tile_hw(self) -> tuple[int, int]:
        """Tile height and width (shorter than ``tile_px`` only on a short axis)."""
        return int(self.weights_y.shape[1]), int(self.weights_x.shape[1])

    @property
    def n_tiles(self) -> int:
        """All tiles of the plan."""
        return int(self.tissue.size)

    @property
    def n_run(self) -> int:
        """Tiles that go through the model."""
        return int(self.tissue.sum())

    def crop_of(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of tile ``(i, j)``'s model input, in tile coordinates."""
        if self.crops is None:
            tile_h, tile_w = self.tile_hw
            return 0, tile_h, 0, tile_w
        y0, y1, x0, x1 = (int(v) for v in self.crops[i, j])
        return y0, y1, x0, x1

    @property
    def model_px(self) -> int:
        """Pixels that go through the model (the tissue tiles, or their crops)."""
        if self.crops is None:
            tile_h, tile_w = self.tile_hw
            return self.n_run * tile_h * tile_w
        boxes = self.crops[self.tissue]
        return int(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).sum())

    @property
    def n_skipped(self) -> int:
        """Background tiles passed through unchanged."""
        return self.n_tiles - self.n_run


def plan_tiles(
    shape_yx: tuple[int, int],
    grid: TileGrid,
    *,
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
) -> TilePlan:
    """Lay tiles over a slide level and mark those touching tissue.

    Parameters
    ----------
    shape_yx : tuple of int
        Height and width of the level in pixels.
    grid : TileGrid
        Tile size and overlap.
    mask : ndarray of shape (Y', X'), bool, optional
        Tissue on a low-resolution grid; ``None`` marks every tile as tissue.
    mask_downsample : float
        Level pixels per mask pixel along each axis.

    Returns
    -------
    TilePlan
    """
    height, width = (int(v) for v in shape_yx)
    origins_y, origins_x = grid.origins(height), grid.origins(width)
    tile_h, tile_w = grid.tile_len(height), grid.tile_len(width)
    if mask is None:
        tissue = np.ones((len(origins_y), len(origins_x)), dtype=bool)
    else:
        tissue = _tiles_touching(
            np.asarray(mask, dtype=bool),
            mask_downsample,
            origins_y,
            origins_x,
            (tile_h, tile_w),
        )
    return TilePlan(
        grid=grid,
        shape_yx=(height, width),
        origins_y=origins_y,
        origins_x=origins_x,
        weights_y=grid.weights(height),
        weights_x=grid.weights(width),
        tissue=tissue,
    )


def _tiles_touching(
    mask: np.ndarray,
    downsample: float,
    origins_y: np.ndarray,
    origins_x: np.ndarray,
    tile_hw: tuple[int, int],
) -> np.ndarray:
    """For each tile, whether any mask pixel under its footprint is set."""
    # Summed-area table: the count of tissue pixels in any rectangle in O(1).
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)

    def bounds(origins: np.ndarray, tile: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(origins / downsample).astype(np.int64), 0, size)
        hi = np.clip(np.ceil((origins + tile) / downsample).astype(np.int64), 0, size)
        return lo, np.maximum(hi, np.minimum(lo + 1, size))

    y0, y1 = bounds(origins_y, tile_hw[0], mask.shape[0])
    x0, x1 = bounds(origins_x, tile_hw[1], mask.shape[1])
    count = (
        table[y1[:, None], x1[None, :]]
        - table[y0[:, None], x1[None, :]]
        - table[y1[:, None], x0[None, :]]
        + table[y0[:, None], x0[None, :]]
    )
    return count > 0
