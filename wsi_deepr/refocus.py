"""The lazy refocusing graph over a slide level.

Every tile is computed exactly once, and the result does not depend on how the slide is
chunked. The tile plan is global (:func:`wsi_deepr.tiling.plan_tiles`); each output chunk
*owns* the tiles whose origin lies inside it. A chunk's task reads the union of its tiles
from the slide, runs the tissue tiles through the model in batches, passes background
tiles through, and accumulates ``weight x output`` over that region: the chunk itself plus
a spill of at most ``tile_px - 1`` pixels to the right and below. A second task per chunk
adds the spills of its upper, left and upper-left neighbours (an overlap-add), converts
back from slide-level normalisation and casts to the slide's dtype. Because the blending
weights are an exact partition of unity, no seam shows at tile or chunk borders.

With chunks a multiple of the tile stride (:func:`default_chunk_px`) a spill is only
``overlap_px`` wide, so what waits in memory between chunks is a thin strip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from wsi_deepr.errors import OptionError
from wsi_deepr.tiling import TileGrid, TilePlan

BatchModel = Callable[[np.ndarray], np.ndarray]
"""Maps a batch ``(n, c, h, w)`` float32 of normalised tiles to outputs of the same shape."""


def default_chunk_px(grid: TileGrid, *, target_px: int = 2048) -> int:
    """Output chunk edge near ``target_px``: a multiple of the stride, at least one tile.

    Parameters
    ----------
    grid : TileGrid
        Tile size and overlap.
    target_px : int
        Wanted chunk edge in pixels.

    Returns
    -------
    int
        ``k x stride_px`` with ``k >= 1`` and the result ``>= tile_px``.
    """
    stride = grid.stride_px
    k = max(1, round(target_px / stride))
    while k * stride < grid.tile_px:
        k += 1
    return k * stride


@dataclass(frozen=True, slots=True)
class _ChunkTiles:
    """The tiles one output chunk owns, in coordinates of its read region."""

    rows: np.ndarray
    """Indices of the tile rows it owns."""
    cols: np.ndarray
    """Indices of the tile columns it owns."""
    region_yx: tuple[int, int, int, int]
    """``(y0, y1, x0, x1)`` of the region it reads and accumulates, in level pixels."""


def _axis_ownership(
    origins: np.ndarray, tile_len: int, extent: int, chunk_px: int
) -> list[tuple[np.ndarray, int, int, int]]:
    """Per chunk along one axis: owned tile indices, chunk start, chunk end, region end."""
    owner = origins // chunk_px
    result = []
    for index, start in enumerate(range(0, extent, chunk_px)):
        end = min(start + chunk_px, extent)
        owned = np.flatnonzero(owner == index)
        region_end = max(end, int(origins[owned].max()) + tile_len) if owned.size else end
        result.append((owned, start, end, region_end))
    return result


def refocus_array(
    data: da.Array,
    plan: TilePlan,
    model: BatchModel,
    *,
    mean: np.ndarray,
    std: np.ndarray,
    chunk_px: int | None = None,
    batch_size: int = 4,
) -> da.Array:
    """Build the lazy refocused level.

    Parameters
    ----------
    data : dask.array.Array of shape (C, Y, X)
        The slide level, any chunking.
    plan : TilePlan
        Tiles, weights and tissue flags for ``data``'s ``(Y, X)``.
    model : callable
        Picklable batch model, e.g. :class:`wsi_deepr.inference.Predictor`.
    mean, std : ndarray of shape (C,)
        Slide-level statistics; the model sees ``(x - mean) / std``.
    chunk_px : int, optional
        Edge of the output chunks; :func:`default_chunk_px` by default. Must be at least
        ``tile_px`` (so spills reach only the next chunk).
    batch_size : int
        Tiles per model call.

    Returns
    -------
    dask.array.Array of shape (C, Y, X)
        Same dtype as ``data``, chunks ``(C, chunk_px, chunk_px)`` (smaller at the end).
    """
    height, width = plan.shape_yx
    if tuple(data.shape[1:]) != (height, width):
        raise ValueError(f"plan is for {plan.shape_yx}, data is {data.shape}")
    chunk_px = chunk_px or default_chunk_px(plan.grid)
    if chunk_px < plan.grid.tile_px:
        raise OptionError("chunk_px", f"{chunk_px} must be at least the tile ({plan.grid.tile_px})")
    if batch_size < 1:
        raise OptionError("--batch-size", f"must be >= 1, got {batch_size}")
    n_channels = int(data.shape[0])
    dtype = np.dtype(data.dtype)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(n_channels, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(n_channels, 1, 1)
    if not (np.all(np.isfinite(std32)) and np.all(std32 > 0) and np.all(np.isfinite(mean32))):
        raise ValueError(f"slide statistics must be finite with std > 0: {mean}, {std}")
    tile_h, tile_w = plan.tile_hw
    rows = _axis_ownership(plan.origins_y, tile_h, height, chunk_px)
    cols = _axis_ownership(plan.origins_x, tile_w, width, chunk_px)

    partial = dask.delayed(_partial_sums, nout=4, pure=True)
    pieces: dict[tuple[int, int], tuple[object, object, object, object]] = {}
    for a, (own_r, y0, y1, ry1) in enumerate(rows):
        for b, (own_c, x0, x1, rx1) in enumerate(cols):
            has_tiles = own_r.size > 0 and own_c.size > 0
            region = data[:, y0:ry1, x0:rx1] if has_tiles else None
            pieces[a, b] = partial(
                region,
                (n_channels, ry1 - y0, rx1 - x0),
                (y1 - y0, x1 - x0),
                plan.origins_y[own_r] - y0,
                plan.origins_x[own_c] - x0,
                plan.weights_y[own_r],
                plan.weights_x[own_c],
                plan.tissue[np.ix_(own_r, own_c)],
                model,
                mean32,
                std32,
                batch_size,
            )

    assemble = dask.delayed(_assemble, pure=True)
    meta = np.empty((0, 0, 0), dtype=dtype)
    block_rows = []
    for a, (_, y0, y1, _) in enumerate(rows):
        block_row = []
        for b, (_, x0, x1, _) in enumerate(cols):
            block = assemble(
                pieces[a, b][0],
                pieces[a - 1, b][2] if a > 0 else None,
                pieces[a, b - 1][1] if b > 0 else None,
                pieces[a - 1, b - 1][3] if a > 0 and b > 0 else None,
                mean32,
                std32,
                dtype,
            )
            shape = (n_channels, y1 - y0, x1 - x0)
            block_row.append(da.from_delayed(block, shape, dtype=dtype, meta=meta))
        block_rows.append(block_row)
    return da.block([block_rows])


def _partial_sums(
    region: np.ndarray | None,
    region_shape: tuple[int, int, int],
    chunk_hw: tuple[int, int],
    origins_y: np.ndarray,
    origins_x: np.ndarray,
    weights_y: np.ndarray,
    weights_x: np.ndarray,
    tissue: np.ndarray,
    model: BatchModel,
    mean: np.ndarray,
    std: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted, normalised outputs of one chunk's tiles over its region, in four pieces.

    Returns the chunk's own area and its spills (right, below, lower-right).
    """
    acc = np.zeros(region_shape, dtype=np.float32)
    if region is not None and origins_y.size and origins_x.size:
        normalised = (np.asarray(region, dtype=np.float32) - mean) / std
        tile_h, tile_w = weights_y.shape[1], weights_x.shape[1]
        pending: list[tuple[int, int]] = []

        def add(i: int, j: int, output: np.ndarray) -> None:
            y, x = int(origins_y[i]), int(origins_x[j])
            weight = weights_y[i][:, None] * weights_x[j][None, :]
            acc[:, y : y + tile_h, x : x + tile_w] += weight * output

        def flush() -> None:
            batch = np.stack(
                [
                    normalised[:, y : y + tile_h, x : x + tile_w]
                    for y, x in ((int(origins_y[i]), int(origins_x[j])) for i, j in pending)
                ]
            )
            outputs = model(batch)
            for (i, j), output in zip(pending, outputs, strict=True):
                add(i, j, output)
            pending.clear()

        for i in range(origins_y.size):
            for j in range(origins_x.size):
                if not tissue[i, j]:
                    y, x = int(origins_y[i]), int(origins_x[j])
                    add(i, j, normalised[:, y : y + tile_h, x : x + tile_w])
                    continue
                pending.append((i, j))
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    chunk_h, chunk_w = chunk_hw
    return (
        acc[:, :chunk_h, :chunk_w],
        acc[:, :chunk_h, chunk_w:].copy(),
        acc[:, chunk_h:, :chunk_w].copy(),
        acc[:, chunk_h:, chunk_w:].copy(),
    )


def _assemble(
    core: np.ndarray,
    from_above: np.ndarray | None,
    from_left: np.ndarray | None,
    from_above_left: np.ndarray | None,
    mean: np.ndarray,
    std: np.ndarray,
    dtype: np.dtype,
) -> np.ndarray:
    """Add the neighbours' spills to a chunk and convert it back to the slide's dtype."""
    total = np.array(core, dtype=np.float32, copy=True)
    for spill in (from_above, from_left, from_above_left):
        if spill is not None and spill.size:
            total[:, : spill.shape[1], : spill.shape[2]] += spill
    total *= std
    total += mean
    return to_dtype(total, dtype)


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert float values to ``dtype``: round, clip to its range for integers.

    Parameters
    ----------
    values : ndarray, float
        Values in the slide's intensity units.
    dtype : numpy dtype
        The slide's dtype.

    Returns
    -------
    ndarray of ``dtype``
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.nan_to_num(values, nan=0.0, posinf=info.max, neginf=info.min)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
        return out.astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    return values.astype(dtype, copy=False)
