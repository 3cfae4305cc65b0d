"""The lazy refocusing graph over a slide level.

Every tile is computed exactly once, and the result does not depend on how the slide is
chunked. The tile plan is global (:func:`wsi_deepr.tiling.plan_tiles`); each output chunk
*owns* the tiles whose origin lies inside it. A chunk's task reads the union of its tiles
from the slide, runs the tissue tiles through the model in batches, passes background
tiles through, and accumulates ``weight x output`` over that region: the chunk itself plus
a spill of at most ``tile_px - 1`` pixels to the right and below. A second task per chunk
adds the spills of its upper, left and upper-left neighbours (an overlap-add), converts
back from slide-level normalisation and casts to the slide's dtype. Because the blending
weights are an exact partition of unity, no seam shows at tile or chunk borders. Where
no tile of a chunk runs the model its core is the input, copied; where only some do
(``--only-blurred``), only the bounding box of those tiles is blended in float.

With chunks a multiple of the tile stride (:func:`default_chunk_px`) a spill is only
``overlap_px`` wide, so what waits in memory between chunks is a thin strip. Each chunk's
task reads its own region (tasks share no input chunks), so memory does not grow with
the slide. For resuming, a chunk task can save its spills to the store's
:class:`~wsi_deepr.chunk_progress.ChunkProgress`, and finished chunks are skipped.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from wsi_deepr.chunk_progress import ChunkProgress
from wsi_deepr.errors import OptionError
from wsi_deepr.local_dask import SYNC
from wsi_deepr.readers.base import region_source
from wsi_deepr.tiling import TileGrid, TilePlan, cell_mask_weight, crop_ramp

BatchModel = Callable[[np.ndarray], np.ndarray]
"""Maps a batch ``(n, c, h, w)`` float32 of normalised tiles to outputs of the same shape."""


def default_chunk_px(
    grid: TileGrid,
    *,
    target_px: int = 2048,
    shape_yx: tuple[int, int] | None = None,
    min_chunks: int = 1,
) -> int:
    """Output chunk edge near ``target_px``: a multiple of the stride, at least one tile.

    Parameters
    ----------
    grid : TileGrid
        Tile size and overlap.
    target_px : int
        Wanted chunk edge in pixels.
    shape_yx : tuple of int, optional
        Slide size; with ``min_chunks``, chunks shrink until the slide has that many, so
        every worker has work on small slides.
    min_chunks : int
        Wanted number of chunks (parallel tasks) at least.

    Returns
    -------
    int
        ``k x stride_px`` with ``k >= 1`` and the result ``>= tile_px``.
    """
    stride = grid.stride_px
    k_min = 1
    while k_min * stride < grid.tile_px:
        k_min += 1
    k = max(k_min, round(target_px / stride))
    if shape_yx is not None:
        height, width = shape_yx
        while (
            k > k_min
            and math.ceil(height / (k * stride)) * math.ceil(width / (k * stride)) < min_chunks
        ):
            k -= 1
    return k * stride


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
    data, plan, model, mean, std, chunk_px, batch_size
        As for :class:`ChunkGraph`, which builds the tasks.

    Returns
    -------
    dask.array.Array of shape (C, Y, X)
        Same dtype as ``data``, chunks ``(C, chunk_px, chunk_px)`` (smaller at the end).
    """
    graph = ChunkGraph(data, plan, model, mean=mean, std=std, chunk_px=chunk_px,
                       batch_size=batch_size)  # fmt: skip
    blocks = graph.blocks()
    meta = np.empty((0, 0, 0), dtype=graph.dtype)
    block_rows = [
        [
            da.from_delayed(blocks[a, b][0], graph.chunk_shape(a, b), dtype=graph.dtype, meta=meta)
            for b in range(len(graph.cols))
        ]
        for a in range(len(graph.rows))
    ]
    return da.block([block_rows])


class ChunkGraph:
    """The refocusing tasks of one slide level, chunk by chunk.

    Parameters
    ----------
    data : dask.array.Array of shape (C, Y, X)
        The slide level, any chunking. Each chunk's task reads its own region from it
        (no input chunk is shared between tasks, so none waits in memory for a
        neighbour).
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
    """

    def __init__(
        self,
        data: da.Array,
        plan: TilePlan,
        model: BatchModel,
        *,
        mean: np.ndarray,
        std: np.ndarray,
        chunk_px: int | None = None,
        batch_size: int = 4,
    ) -> None:
        height, width = plan.shape_yx
        if tuple(data.shape[1:]) != (height, width):
            raise ValueError(f"plan is for {plan.shape_yx}, data is {data.shape}")
        chunk_px = chunk_px or default_chunk_px(plan.grid)
        if chunk_px < plan.grid.tile_px:
            raise OptionError(
                "--chunk-px", f"{chunk_px} must be at least the tile ({plan.grid.tile_px})"
            )
        if batch_size < 1:
            raise OptionError("--batch-size", f"must be >= 1, got {batch_size}")
        self.data = data
        self.plan = plan
        self.model = model
        self.chunk_px = int(chunk_px)
        n_channels = int(data.shape[0])
        self.dtype = np.dtype(data.dtype)
        mean32 = np.asarray(mean, dtype=np.float32).reshape(n_channels, 1, 1)
        std32 = np.asarray(std, dtype=np.float32).reshape(n_channels, 1, 1)
        if not (np.all(np.isfinite(std32)) and np.all(std32 > 0) and np.all(np.isfinite(mean32))):
            raise ValueError(f"slide statistics must be finite with std > 0: {mean}, {std}")
        self.scaling = _Scaling(mean32, std32, self.dtype, batch_size)
        tile_h, tile_w = plan.tile_hw
        self.rows = _axis_ownership(plan.origins_y, tile_h, height, self.chunk_px)
        self.cols = _axis_ownership(plan.origins_x, tile_w, width, self.chunk_px)

    @property
    def n_chunks(self) -> int:
        """Number of output chunks."""
        return len(self.rows) * len(self.cols)

    def chunk_shape(self, a: int, b: int) -> tuple[int, int, int]:
        """Shape ``(c, h, w)`` of chunk ``(a, b)``."""
        _, y0, y1, _ = self.rows[a]
        _, x0, x1, _ = self.cols[b]
        return (int(self.data.shape[0]), y1 - y0, x1 - x0)

    def chunk_origin(self, a: int, b: int) -> tuple[int, int]:
        """Level-0 ``(y, x)`` of chunk ``(a, b)``'s first pixel."""
        return self.rows[a][1], self.cols[b][1]

    def blocks(
        self,
        *,
        done: frozenset[tuple[int, int]] = frozenset(),
        progress: ChunkProgress | None = None,
    ) -> dict[tuple[int, int], tuple[Delayed, Delayed]]:
        """Lazy finished chunks: ``(a, b) -> (block, tiles run)``, for chunks not ``done``.

        Parameters
        ----------
        done : frozenset of (int, int)
            Chunks already finished (written by an earlier run); they get no task, except
            that their spills are loaded from ``progress`` when a neighbour needs them.
        progress : ChunkProgress, optional
            Where every chunk task saves its spills (so a later run can resume) and
            where finished chunks' spills are loaded from.

        Returns
        -------
        dict
            ``block`` is the chunk in the slide's dtype; ``tiles run`` the number of tiles
            that went through the model in its task.
        """
        if done and progress is None:
            raise ValueError("finished chunks need a spill store for their neighbours")
        n_rows, n_cols = len(self.rows), len(self.cols)
        todo = [(a, b) for a in range(n_rows) for b in range(n_cols) if (a, b) not in done]
        needed = set(todo)
        for a, b in todo:  # neighbours whose spills reach a chunk still to do
            needed.update(
                (a - da_, b - db) for da_, db in ((1, 0), (0, 1), (1, 1)) if a >= da_ and b >= db
            )
        # Keys are named here: hashing every task's arguments (pure=True) took half of the
        # graph's construction time (13 ms per chunk).
        name = f"refocus-{uuid.uuid4().hex}"
        partial = dask.delayed(_partial_chunk, nout=7)
        load = dask.delayed(_load_spills, nout=3)
        pieces: dict[tuple[int, int], Any] = {}
        for a, b in sorted(needed):
            if (a, b) in done:
                assert progress is not None
                right, bottom, corner = load(progress, a, b, dask_key_name=f"{name}-load-{a}-{b}")
                pieces[a, b] = (None, None, None, right, bottom, corner, 0)
            else:
                pieces[a, b] = partial(self._region(a, b), *self._chunk_args(a, b), progress,
                                       dask_key_name=f"{name}-partial-{a}-{b}")  # fmt: skip

        assemble = dask.delayed(_assemble)
        blocks: dict[tuple[int, int], tuple[Delayed, Delayed]] = {}
        for a, b in todo:
            piece = pieces[a, b]
            block = assemble(
                piece[0],
                piece[1],
                piece[2],
                pieces[a - 1, b][4] if a > 0 else None,
                pieces[a, b - 1][3] if b > 0 else None,
                pieces[a - 1, b - 1][5] if a > 0 and b > 0 else None,
                self.scaling,
                # Unused here, but taking them releases the chunk's task result (which
                # holds the core) now rather than when the next row needs its spills.
                (piece[3], piece[4], piece[5]),
                dask_key_name=f"{name}-assemble-{a}-{b}",
            )
            blocks[a, b] = (block, piece[6])
        return blocks

    def _region(self, a: int, b: int) -> _RegionRead | None:
        own_r, y0, _, ry1 = self.rows[a]
        own_c, x0, _, rx1 = self.cols[b]
        if not (own_r.size and own_c.size):
            return None
        source = region_source(self.data)
        if source is not None:
            return _RegionRead(source, (y0, ry1, x0, rx1))
        (region,) = dask.optimize(self.data[:, y0:ry1, x0:rx1])
        return _RegionRead(region, None)

    def _chunk_args(self, a: int, b: int) -> tuple[Any, ...]:
        own_r, y0, y1, ry1 = self.rows[a]
        own_c, x0, x1, rx1 = self.cols[b]
        plan = self.plan
        # Spills arriving from the chunk above / to the left: the top rows and left
        # columns of a chunk stay float until they are added; the rest is converted in
        # the chunk's task, so a chunk waiting for its neighbours holds its final dtype.
        margin_y = self.rows[a - 1][3] - self.rows[a - 1][2] if a > 0 else 0
        margin_x = self.cols[b - 1][3] - self.cols[b - 1][2] if b > 0 else 0
        geometry = _ChunkGeometry(
            region_shape=(int(self.data.shape[0]), ry1 - y0, rx1 - x0),
            chunk_hw=(y1 - y0, x1 - x0),
            margin_yx=(margin_y, margin_x),
            index=(a, b),
        )
        return (
            geometry,
            plan.origins_y[own_r] - y0,
            plan.origins_x[own_c] - x0,
            plan.weights_y[own_r],
            plan.weights_x[own_c],
            plan.tissue[np.ix_(own_r, own_c)],
            self._selection(a, b),
            self.model,
            self.scaling,
        )

    def _selection(self, a: int, b: int) -> _Selection | None:
        """Crops and refocus cells of the chunk's tiles (``--only-blurred``)."""
        plan = self.plan
        if plan.crops is None and plan.cells is None:
            return None
        own_r, y0, _, ry1 = self.rows[a]
        own_c, x0, _, rx1 = self.cols[b]
        boxes = None if plan.crops is None else plan.crops[np.ix_(own_r, own_c)]
        if plan.cells is None:
            return _Selection(boxes, plan.grid, None, 0, (0, 0))
        cell = plan.cell_px
        cy0, cx0 = max(0, y0 // cell - 1), max(0, x0 // cell - 1)
        cy1, cx1 = -(-ry1 // cell) + 1, -(-rx1 // cell) + 1
        cells = plan.cells[cy0:cy1, cx0:cx1].copy()
        return _Selection(boxes, plan.grid, cells, cell, (y0 - cy0 * cell, x0 - cx0 * cell))


class _RegionRead:
    """A slide region read when its chunk's task runs.

    Dask does not look inside this holder, so the region's input chunks are not shared
    graph keys: no input chunk waits in memory for the neighbour that also needs it.
    It holds the level's file source and the box where there is one
    (:func:`wsi_deepr.readers.base.region_source`: each file tile decoded once), else
    the region as a Dask array.
    """

    __slots__ = ("array", "box")

    def __init__(self, array: Any, box: tuple[int, int, int, int] | None) -> None:
        self.array = array
        self.box = box

    def read(self) -> np.ndarray:
        if self.box is not None:
            y0, y1, x0, x1 = self.box
            return np.asarray(self.array[:, y0:y1, x0:x1])
        return np.asarray(self.array.compute(scheduler=SYNC))


@dataclass(frozen=True, slots=True)
class _ChunkGeometry:
    """Shapes of one chunk's task."""

    region_shape: tuple[int, int, int]
    """``(c, y, x)`` of the region its tiles cover (the chunk plus its spills)."""
    chunk_hw: tuple[int, int]
    """Height and width of the chunk itself."""
    margin_yx: tuple[int, int]
    """Rows at the top and columns at the left that neighbours' spills reach."""
    index: tuple[int, int]
    """Chunk row and column."""


@dataclass(frozen=True, slots=True)
class _Selection:
    """Where in a chunk's model tiles the output is used (``--only-blurred``)."""

    boxes: np.ndarray | None
    """``(n_rows, n_cols, 4)`` ``(y0, y1, x0, x1)``: the tiles' crops in tile coordinates
    (:attr:`TilePlan.crops`); ``None``: whole tiles."""
    grid: TileGrid
    """For the crops' ramps (:func:`wsi_deepr.tiling.crop_ramp`)."""
    cells: np.ndarray | None
    """The refocus cells around the chunk's region (:attr:`TilePlan.cells`), or ``None``."""
    cell_px: int
    """Edge of one cell in pixels."""
    offset_yx: tuple[int, int]
    """Pixel of ``cells``' grid at the region's first pixel."""

    def crop(self, i: int, j: int, whole: tuple[int, int, int, int]) -> tuple[int, ...]:
        """Tile ``(i, j)``'s crop (``whole`` without crops)."""
        return whole if self.boxes is None else tuple(int(v) for v in self.boxes[i, j])

    def weight(self, box: tuple[int, int, int, int], tile_hw: tuple[int, int],
               at_yx: tuple[int, int]) -> np.ndarray | None:  # fmt: skip
        """Weight of the model's output against the input over a crop ``box`` of a tile
        at ``at_yx`` in the region: the crop's ramps times the cells' mask (``None``
        where it is 1 throughout: the model's output as it is)."""
        y0, y1, x0, x1 = box
        weight = None
        if box != (0, tile_hw[0], 0, tile_hw[1]):
            weight = (
                crop_ramp(self.grid, y0, y1, tile_hw[0])[:, None]
                * crop_ramp(self.grid, x0, x1, tile_hw[1])[None, :]
            )
        if self.cells is not None:
            oy, ox = at_yx[0] + self.offset_yx[0], at_yx[1] + self.offset_yx[1]
            cells = cell_mask_weight(self.cells, self.cell_px,
                                     (oy + y0, oy + y1, ox + x0, ox + x1))  # fmt: skip
            if not cells.all() or weight is not None:
                weight = cells if weight is None else weight * cells
        return weight


@dataclass(frozen=True, slots=True)
class _Scaling:
    """Normalisation and output conversion."""

    mean: np.ndarray
    """``(c, 1, 1)`` float32."""
    std: np.ndarray
    """``(c, 1, 1)`` float32."""
    dtype: np.dtype
    """Output dtype."""
    batch_size: int
    """Tiles per model call."""


def _partial_chunk(
    region_read: _RegionRead | None,
    geometry: _ChunkGeometry,
    origins_y: np.ndarray,
    origins_x: np.ndarray,
    weights_y: np.ndarray,
    weights_x: np.ndarray,
    tissue: np.ndarray,
    crops: _Selection | None,
    model: BatchModel,
    scaling: _Scaling,
    progress: ChunkProgress | None = None,
) -> tuple[Any, ...]:
    """Run one chunk's tiles and blend them over its region.

    Returns ``(core, top, left, right, bottom, corner, tiles_run)``: the chunk in the
    output dtype (final except its top and left margins), the float sums of those margins
    (``top`` spans the full width, ``left`` the rows below ``top``), the float spills to
    the right, below and lower right (also saved to ``progress`` when given), and how
    many tiles went through the model.
    """
    has_tiles = region_read is not None and origins_y.size and origins_x.size
    if has_tiles and not tissue.any():
        assert region_read is not None
        return _passed_through(
            region_read.read(), geometry, origins_y, origins_x, weights_y, weights_x, scaling,
            progress,
        )  # fmt: skip
    if has_tiles and not tissue.all():
        assert region_read is not None
        return _mixed(
            region_read.read(), geometry, origins_y, origins_x, weights_y, weights_x, tissue,
            crops, model, scaling, progress,
        )  # fmt: skip
    tiles_run = 0
    if has_tiles:
        assert region_read is not None
        region = region_read.read()
        box = (0, region.shape[1], 0, region.shape[2])
        acc, tiles_run = _blend_tiles(
            region, box, origins_y, origins_x, weights_y, weights_x, tissue, crops, model,
            scaling,
        )  # fmt: skip
    else:
        acc = np.zeros(geometry.region_shape, dtype=np.float32)
    chunk_h, chunk_w = geometry.chunk_hw
    top_px, left_px = geometry.margin_yx
    core = np.zeros((acc.shape[0], chunk_h, chunk_w), dtype=scaling.dtype)
    _finish_into(core[:, top_px:, left_px:], acc[:, top_px:chunk_h, left_px:chunk_w], scaling)
    spills = (
        acc[:, :chunk_h, chunk_w:].copy(),
        acc[:, chunk_h:, :chunk_w].copy(),
        acc[:, chunk_h:, chunk_w:].copy(),
    )
    if progress is not None:
        progress.save_spills(geometry.index, spills)
    return (
        core,
        acc[:, :top_px, :chunk_w].copy(),
        acc[:, top_px:chunk_h, :left_px].copy(),
        *spills,
        tiles_run,
    )


def _blend_tiles(
    region: np.ndarray,
    box: tuple[int, int, int, int],
    origins_y: np.ndarray,
    origins_x: np.ndarray,
    weights_y: np.ndarray,
    weights_x: np.ndarray,
    tissue: np.ndarray,
    crops: _Selection | None,
    model: BatchModel,
    scaling: _Scaling,
) -> tuple[np.ndarray, int]:
    """``sum(weight x output)`` of the tiles over ``box = (y0, y1, x0, x1)`` of the region.

    Tissue tiles go through the model in batches, the others pass their normalised input
    through; a tile with a crop sends only the crop, alone, and blends its output into
    the tile's input with the crop's ramp. Tiles reaching past the box are clipped to
    it. Every pixel of the box gets its tiles' terms in the same order whatever the box,
    so its value does not depend on it. Returns the float32 sums (the box's shape) and
    the number of model tiles.
    """
    by0, by1, bx0, bx1 = box
    acc = np.zeros((region.shape[0], by1 - by0, bx1 - bx0), dtype=np.float32)
    mean, std = scaling.mean, scaling.std
    tile_h, tile_w = weights_y.shape[1], weights_x.shape[1]
    pending: list[tuple[int, int]] = []
    tiles_run = 0
    # Tiles share a handful of distinct weight rows (inner ones, edges): one 2-D weight
    # per distinct pair, the same product as tile by tile.
    kind_y = np.unique(weights_y, axis=0, return_inverse=True)[1].ravel()
    kind_x = np.unique(weights_x, axis=0, return_inverse=True)[1].ravel()
    weights_2d: dict[tuple[int, int], np.ndarray] = {}
    rows = [i for i in range(origins_y.size) if origins_y[i] < by1 and origins_y[i] + tile_h > by0]
    cols = [j for j in range(origins_x.size) if origins_x[j] < bx1 and origins_x[j] + tile_w > bx0]

    def clip(i: int, j: int) -> tuple[slice, slice, slice, slice]:
        """(rows, cols) of the tile's part inside the box: in the tile, in the box."""
        y, x = int(origins_y[i]), int(origins_x[j])
        y0, y1 = max(y, by0), min(y + tile_h, by1)
        x0, x1 = max(x, bx0), min(x + tile_w, bx1)
        return (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x),
                slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))  # fmt: skip

    def normalised(i: int, j: int, whole: bool) -> np.ndarray:
        y, x = int(origins_y[i]), int(origins_x[j])
        tile = region[:, y : y + tile_h, x : x + tile_w]
        if not whole:  # a pass-through tile: only its part in the box is needed
            ty, tx, _, _ = clip(i, j)
            tile = tile[:, ty, tx]
        # a new float32 array (float32 input is not normalised in place, twice)
        tile = np.subtract(tile, mean, dtype=np.float32)
        tile /= std
        return tile

    def add(i: int, j: int, output: np.ndarray, whole: bool) -> None:
        kind = (int(kind_y[i]), int(kind_x[j]))
        weight = weights_2d.get(kind)
        if weight is None:
            weight = weights_2d[kind] = weights_y[i][:, None] * weights_x[j][None, :]
        ty, tx, ay, ax = clip(i, j)
        if whole and output.shape[1:] != (ty.stop - ty.start, tx.stop - tx.start):
            output = output[:, ty, tx]
        output *= weight[ty, tx]  # the model's output or a fresh array: ours to change
        acc[:, ay, ax] += output

    def selected(
        i: int, j: int, tile: np.ndarray, output: np.ndarray, box: tuple[int, ...]
    ) -> None:
        """Blend the model's output on ``box`` into the tile's input, and add the tile."""
        assert crops is not None
        y0, y1, x0, x1 = box
        weight = crops.weight((y0, y1, x0, x1), (tile_h, tile_w),
                              (int(origins_y[i]), int(origins_x[j])))  # fmt: skip
        if weight is None and box == whole:
            add(i, j, output, True)  # the model's output, as without a selection
            return
        inside = tile[:, y0:y1, x0:x1]
        if weight is None:  # the model's output throughout the box
            inside[...] = output
        else:
            output -= inside
            output *= weight
            inside += output
        add(i, j, tile, True)

    def flush() -> None:
        nonlocal tiles_run
        if not pending:
            return
        tiles_run += len(pending)
        inputs = [normalised(i, j, True) for i, j in pending]
        outputs = model(np.stack(inputs))
        for (i, j), tile, output in zip(pending, inputs, outputs, strict=True):
            if crops is None:
                add(i, j, output, True)
            else:
                selected(i, j, tile, output, whole)
        pending.clear()

    def run_cropped(i: int, j: int, crop: tuple[int, ...]) -> None:
        nonlocal tiles_run
        tiles_run += 1
        cy0, cy1, cx0, cx1 = crop
        tile = normalised(i, j, True)
        # a copy: a model may hand its input back, and the blend writes into the tile
        output = model(tile[:, cy0:cy1, cx0:cx1].copy()[None])[0]
        selected(i, j, tile, output, crop)

    whole = (0, tile_h, 0, tile_w)
    for i in rows:
        for j in cols:
            if not tissue[i, j]:
                add(i, j, normalised(i, j, False), False)  # background passes through
                continue
            crop = whole if crops is None else crops.crop(i, j, whole)
            if crop != whole:
                flush()  # the terms stay in tile order
                run_cropped(i, j, crop)
                continue
            pending.append((i, j))
            if len(pending) == scaling.batch_size:
                flush()
    flush()
    return acc, tiles_run


def _mixed(
    region: np.ndarray,
    geometry: _ChunkGeometry,
    origins_y: np.ndarray,
    origins_x: np.ndarray,
    weights_y: np.ndarray,
    weights_x: np.ndarray,
    tissue: np.ndarray,
    crops: _Selection | None,
    model: BatchModel,
    scaling: _Scaling,
    progress: ChunkProgress | None,
) -> tuple[Any, ...]:
    """:func:`_partial_chunk` for a chunk where some tiles go through the model.

    The chunk is first passed through (:func:`_passed_through`: the core copied, the
    margins and spills weighted at once); then, over the bounding box of its model tiles
    only (of their crops, where they have one), every tile reaching the box is blended
    in float (:func:`_blend_tiles`) and replaces those pixels: the same values there as
    blending the whole chunk, with the float work of the box (``--only-blurred`` chunks
    with a few blurred tiles).
    """
    tile_h, tile_w = weights_y.shape[1], weights_x.shape[1]
    run_rows, run_cols = np.nonzero(tissue)
    if crops is None or crops.boxes is None:
        boxes = np.tile(np.array([0, tile_h, 0, tile_w]), (run_rows.size, 1))
    else:
        boxes = crops.boxes[run_rows, run_cols]
    by0 = int((origins_y[run_rows] + boxes[:, 0]).min())
    bx0 = int((origins_x[run_cols] + boxes[:, 2]).min())
    by1 = min(int((origins_y[run_rows] + boxes[:, 1]).max()), region.shape[1])
    bx1 = min(int((origins_x[run_cols] + boxes[:, 3]).max()), region.shape[2])
    core, top, left, right, bottom, corner, _ = _passed_through(
        region, geometry, origins_y, origins_x, weights_y, weights_x, scaling, None
    )
    acc, tiles_run = _blend_tiles(
        region, (by0, by1, bx0, bx1), origins_y, origins_x, weights_y, weights_x, tissue,
        crops, model, scaling,
    )  # fmt: skip
    chunk_h, chunk_w = geometry.chunk_hw
    top_px, left_px = geometry.margin_yx

    def overlay(piece: np.ndarray, origin_yx: tuple[int, int], finish: bool = False) -> None:
        py0, px0 = origin_yx
        y0, y1 = max(by0, py0), min(by1, py0 + piece.shape[1])
        x0, x1 = max(bx0, px0), min(bx1, px0 + piece.shape[2])
        if y1 <= y0 or x1 <= x0:
            return
        source = acc[:, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        target = piece[:, y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
        if finish:
            _finish_into(target, source, scaling)
        else:
            target[...] = source

    overlay(core[:, top_px:, left_px:], (top_px, left_px), finish=True)
    overlay(top, (0, 0))
    overlay(left, (top_px, 0))
    overlay(right, (0, chunk_w))
    overlay(bottom, (chunk_h, 0))
    overlay(corner, (chunk_h, chunk_w))
    if progress is not None:
        progress.save_spills(geometry.index, (right, bottom, corner))
    return (core, top, left, right, bottom, corner, tiles_run)


def _passed_through(
    region: np.ndarray,
    geometry: _ChunkGeometry,
    origins_y: np.ndarray,
    origins_x: np.ndarray,
    weights_y: np.ndarray,
    weights_x: np.ndarray,
    scaling: _Scaling,
    progress: ChunkProgress | None,
) -> tuple[Any, ...]:
    """:func:`_partial_chunk` for a chunk none of whose tiles goes through the model.

    Its tiles pass the input through, so the chunk's core (where only its own tiles reach,
    their weights summing to one) is the input itself, copied. Only the top and left
    margins and the spills, which meet the neighbours' tiles, are weighted in float, and
    at once: the summed weights of a full grid of tiles are separable (background,
    glass and the in-focus tissue of ``--only-blurred``).
    """
    chunk_h, chunk_w = geometry.chunk_hw
    top_px, left_px = geometry.margin_yx
    summed_y = _summed_weights(origins_y, weights_y, region.shape[1])
    summed_x = _summed_weights(origins_x, weights_x, region.shape[2])

    def weighted(rows: slice, cols: slice) -> np.ndarray:
        part = np.subtract(region[:, rows, cols], scaling.mean, dtype=np.float32)
        part /= scaling.std
        part *= summed_y[rows, None]
        part *= summed_x[None, cols]
        return part

    core = np.zeros((region.shape[0], chunk_h, chunk_w), dtype=scaling.dtype)
    core[:, top_px:, left_px:] = region[:, top_px:chunk_h, left_px:chunk_w]
    spills = (
        weighted(slice(0, chunk_h), slice(chunk_w, None)),
        weighted(slice(chunk_h, None), slice(0, chunk_w)),
        weighted(slice(chunk_h, None), slice(chunk_w, None)),
    )
    if progress is not None:
        progress.save_spills(geometry.index, spills)
    top = weighted(slice(0, top_px), slice(0, chunk_w))
    left = weighted(slice(top_px, chunk_h), slice(0, left_px))
    return (core, top, left, *spills, 0)


def _summed_weights(origins: np.ndarray, weights: np.ndarray, length: int) -> np.ndarray:
    """Sum of the 1-D blending weights of tiles at ``origins`` along one axis."""
    total = np.zeros(length, dtype=np.float32)
    for origin, weight in zip(origins, weights, strict=True):
        total[int(origin) : int(origin) + weight.size] += weight
    return total


def _load_spills(
    progress: ChunkProgress, a: int, b: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spills of a chunk finished by an earlier run."""
    return progress.load_spills((a, b))


def _finish_into(out: np.ndarray, normalised: np.ndarray, scaling: _Scaling) -> None:
    """De-normalise and convert to the output dtype, in row slabs (small temporaries)."""
    slab_px = 256
    for y in range(0, normalised.shape[1], slab_px):
        values = normalised[:, y : y + slab_px] * scaling.std
        values += scaling.mean
        out[:, y : y + slab_px] = to_dtype(values, scaling.dtype)


def _assemble(
    core: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    from_above: np.ndarray | None,
    from_left: np.ndarray | None,
    from_above_left: np.ndarray | None,
    scaling: _Scaling,
    own_spills: tuple[np.ndarray, ...] = (),
) -> np.ndarray:
    """Add the neighbours' spills to a chunk's margins and finish them.

    ``own_spills`` are ignored: depending on them frees the chunk's task result early.
    """
    # The core's margins are overwritten (not added to), so finishing it in place is
    # safe even if this task runs twice.
    out = core
    top_px, left_px = top.shape[1], left.shape[2]
    top = top.copy()
    left = left.copy()
    if from_above is not None:
        top[:, : from_above.shape[1], : from_above.shape[2]] += from_above
    if from_above_left is not None:
        top[:, : from_above_left.shape[1], : from_above_left.shape[2]] += from_above_left
    if from_left is not None:
        rows_px, cols_px = from_left.shape[1], from_left.shape[2]
        top[:, : min(rows_px, top_px), :cols_px] += from_left[:, :top_px]
        left[:, : max(0, rows_px - top_px), :cols_px] += from_left[:, top_px:]
    _finish_into(out[:, :top_px, :], top, scaling)
    _finish_into(out[:, top_px:, :left_px], left, scaling)
    return out


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert float values to ``dtype``: round and clip to its range for integers.

    For integer types NaN becomes the type's minimum and infinities its ends.

    ``values`` may be modified in place.

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
        # fmax/fmin map NaN to the bound (NaN -> minimum, +-inf -> the ends of the range)
        # in two passes; nan_to_num + clip took four.
        np.fmax(values, info.min, out=values)
        np.fmin(values, info.max, out=values)
        np.rint(values, out=values)
        return values.astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    return values.astype(dtype, copy=False)
