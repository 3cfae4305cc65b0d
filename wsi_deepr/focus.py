"""Focus map of a slide: a no-reference sharpness score per cell, and where it is blurred.

The score is spectral. Each cell of a regular grid on level 0 is the centre of a window
twice its size (Hann-tapered, mean removed); the window's power spectrum is averaged over
two annuli in physical frequency: a *low* band (0.05-0.15 cycles/um, structure that
defocus of a few micrometres keeps) and a *high* band (0.35-0.7 cycles/um, detail that a
defocus of 2 um at NA 0.75 already removes, under Köhler illumination too). Their ratio
measures fine detail relative to the cell's own contrast, so stain strength and
brightness cancel.

Calibration on in-focus tissue: the ratio of in-focus tissue varies with what the tissue
is (about 1.5 stops between the 5th and 50th percentile on CMU-1), so it is compared with
the same slide's own tissue. The *reference* is the 60th percentile of the log2 ratio over
all tissue cells; the focus score is ``log2(ratio) - reference`` in stops: 0 is typical
in-focus tissue of this slide, -1 half its relative fine detail. This assumes that most of
the tissue is in focus (with up to about half of it blurred, the reference still falls on
sharp tissue); a slide blurred everywhere scores 0 everywhere and is not flagged.
:data:`DEFAULT_BLUR_STOPS` flags cells scoring below -2.5 stops (a sixth of the detail).
``pipelines/calibrate_focus.py`` measured where that falls on four real H&E images
(CMU-1 at 0.499 um/px, three OpenSlide crops at 0.227-0.346 um/px) blurred uniformly in
linear light through NA 0.75 under Köhler illumination (condenser NA 0.5): in focus 0-3.1%
of cells flagged, 1 um 4-34%, 1.5 um 72-78%, 2 um 98-100%, 3 um 100%. The default thus
means "more than about 1.5 um out of focus". (The earlier high band, 0.25-0.5 cycles/um,
flagged only 44-68% at 2 um under Köhler illumination: the illumination cone blurs less
than the objective's incoherent PSF it had been set for.)

The band powers come from :func:`wsi_deepr.spectra.scan_slide`, whose same pass also
measures the spectra for :mod:`wsi_deepr.defocus_estimate`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from wsi_deepr.spectra import SlideSpectra
from wsi_deepr.tiling import TilePlan

LOG = logging.getLogger("wsi_deepr")

REFERENCE_PERCENTILE = 60.0
"""Percentile of the tissue cells' log2 band ratio taken as in-focus reference."""
DEFAULT_BLUR_STOPS = 2.5
"""A cell is blurred when its score is below minus this many stops (fine detail down to
less than a sixth of the slide's in-focus tissue)."""
MIN_REGION_CELLS = 4
"""``--only-blurred`` refocuses blurred regions of at least this many cells (2 x 2, about
32 x 32 um): smaller ones are texture, not defocus (:func:`tiles_needing_model`)."""
CROP_MULTIPLE_PX = 16
"""Crops of ``--only-blurred`` tiles are rounded up to this multiple (:func:`model_crops`)."""
CROP_WHOLE_FRACTION = 0.8
"""A crop of more than this share of its tile runs the whole tile (:func:`model_crops`)."""
MIN_CONTRAST = 1e-3
"""Cells whose low-band power is below this fraction of the tissue median are not judged
(glass inside the tissue outline, empty lumina): nothing there to refocus."""


@dataclass(frozen=True, slots=True)
class FocusMap:
    """Focus score on a regular grid of cells over level 0."""

    cell_px: int
    """Edge of one cell in level-0 pixels (cell ``(i, j)`` starts at ``(i, j) * cell_px``)."""
    mpp: float
    """Level-0 pixel size in micrometres."""
    score: np.ndarray
    """``(ny, nx)`` float32 focus score in stops (NaN where not judged)."""
    tissue: np.ndarray
    """``(ny, nx)`` bool: the cell lies on tissue (thumbnail mask, at least half)."""
    reference_log2: float
    """log2 band ratio of the slide's in-focus tissue (the score's zero)."""

    @property
    def judged(self) -> np.ndarray:
        """Cells with a score (tissue with enough contrast)."""
        return np.isfinite(self.score)

    def blurred(self, blur_stops: float = DEFAULT_BLUR_STOPS) -> np.ndarray:
        """``(ny, nx)`` bool: judged cells scoring below ``-blur_stops``."""
        with np.errstate(invalid="ignore"):
            return np.asarray(self.judged & (self.score < -blur_stops), dtype=bool)

    def summary(self, blur_stops: float = DEFAULT_BLUR_STOPS) -> dict[str, float | int | None]:
        """JSON-ready figures: cells, blurred fraction of judged tissue, score percentiles."""
        judged = self.score[self.judged]
        blurred = self.blurred(blur_stops)
        return {
            "cell_px": self.cell_px,
            "cell_um": self.cell_px * self.mpp,
            "blur_stops": blur_stops,
            "reference_log2": self.reference_log2,
            "cells_tissue": int(self.tissue.sum()),
            "cells_judged": int(judged.size),
            "cells_blurred": int(blurred.sum()),
            "blurred_fraction": float(blurred.sum() / judged.size) if judged.size else 0.0,
            "blurred_mm2": float(blurred.sum()) * (self.cell_px * self.mpp * 1e-3) ** 2,
            "score_p05": _percentile(judged, 5),
            "score_p50": _percentile(judged, 50),
        }


def focus_map(spectra: SlideSpectra, *, reference_log2: float | None = None) -> FocusMap:
    """Focus score from a slide's band ratios, referenced to its own tissue.

    Parameters
    ----------
    spectra : SlideSpectra
        From :func:`scan_slide`.
    reference_log2 : float, optional
        Use this zero instead of the slide's own (e.g. the input's, for a refocused
        output, so both maps are on one scale).

    Returns
    -------
    FocusMap
        Median-filtered (3 x 3 cells, judged cells only) score in stops.
    """
    tissue = spectra.tissue
    contrast = spectra.low_power
    ratio = spectra.log2_ratio
    finite = np.isfinite(ratio) & tissue
    if not finite.any():
        empty = np.full(ratio.shape, np.nan, dtype=np.float32)
        return FocusMap(spectra.cell_px, spectra.mpp, empty, tissue, float("nan"))
    floor = MIN_CONTRAST * float(np.median(contrast[finite]))
    judged = finite & (contrast > floor)
    if reference_log2 is None:
        reference = float(np.percentile(ratio[judged], REFERENCE_PERCENTILE))
    else:
        reference = float(reference_log2)
    raw = np.where(judged, ratio - reference, np.nan).astype(np.float32)
    return FocusMap(spectra.cell_px, spectra.mpp, _nan_median3(raw), tissue, reference)


def _nan_median3(values: np.ndarray) -> np.ndarray:
    """3 x 3 median over finite neighbours; NaN cells stay NaN."""
    padded = np.pad(values, 1, constant_values=np.nan)
    stack = sliding_window_view(padded, (3, 3)).reshape(*values.shape, 9)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            smoothed = np.nanmedian(stack, axis=-1)
    return np.where(np.isfinite(values), smoothed, np.nan).astype(np.float32)


def tiles_needing_model(
    fmap: FocusMap,
    plan: TilePlan,
    *,
    blur_stops: float = DEFAULT_BLUR_STOPS,
    grow_cells: int = 1,
    min_region_cells: int = MIN_REGION_CELLS,
) -> np.ndarray:
    """Tiles whose footprint holds blurred cells, for ``run --only-blurred``.

    Parameters
    ----------
    fmap : FocusMap
        The input's focus map.
    plan : TilePlan
        The run's tiles.
    blur_stops : float
        A cell is blurred below a score of ``-blur_stops``.
    grow_cells : int
        Blurred regions are grown by this many cells first: cells at a region's edge mix
        sharp and blurred pixels in their window and score in between.
    min_region_cells : int
        Blurred regions (8-connected across gaps of one cell) of fewer blurred cells are
        left alone: defocus varies smoothly over a slide, so a lone cell scoring low among
        sharp ones is texture without fine detail (a lumen's rim, smooth stroma), not a
        focus error, and one 16 um cell would cost a whole model tile. The focus map still
        shows them.

    Returns
    -------
    ndarray of bool, shape (ny_tiles, nx_tiles)
        ``True`` for tiles to send through the model; AND it into ``plan.tissue``.
    """
    cells = _cells_to_refocus(fmap, blur_stops, grow_cells, min_region_cells)
    return _tiles_over(cells, fmap.cell_px, plan)


def _tiles_over(cells: np.ndarray, cell_px: int, plan: TilePlan) -> np.ndarray:
    """Tiles whose footprint holds one of ``cells`` (:func:`tiles_needing_model`)."""
    table = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = cells.cumsum(0).cumsum(1)
    y0, y1 = _cell_span(plan.origins_y, plan.tile_hw[0], plan, cell_px, cells.shape[0])
    x0, x1 = _cell_span(plan.origins_x, plan.tile_hw[1], plan, cell_px, cells.shape[1])
    count = (
        table[y1[:, None], x1[None, :]]
        - table[y0[:, None], x1[None, :]]
        - table[y1[:, None], x0[None, :]]
        + table[y0[:, None], x0[None, :]]
    )
    return np.asarray(count > 0, dtype=bool)


def model_crops(
    fmap: FocusMap,
    plan: TilePlan,
    *,
    blur_stops: float = DEFAULT_BLUR_STOPS,
    grow_cells: int = 1,
    min_region_cells: int = MIN_REGION_CELLS,
    multiple_px: int = CROP_MULTIPLE_PX,
    whole_fraction: float = CROP_WHOLE_FRACTION,
) -> np.ndarray:
    """The part of each tile that the model needs to see, for ``run --only-blurred``.

    A tile at the edge of a blurred region often holds blurred cells in a corner only.
    Its crop is the bounding box of those cells (as :func:`tiles_needing_model` finds
    them, in the tile's footprint) grown by ``overlap_px`` (at least a cell) of context,
    so that the crop's ramp (:func:`wsi_deepr.tiling.crop_ramp`) is 1 over every one of
    them and the cells' weight (:func:`wsi_deepr.tiling.cell_mask_weight`) 0 at its
    edges; it is clipped to the tile and rounded up to ``multiple_px``. A crop of more
    than ``whole_fraction`` of the tile is the whole tile.

    Parameters
    ----------
    fmap, plan, blur_stops, grow_cells, min_region_cells
        As for :func:`tiles_needing_model`.
    multiple_px : int
        Crop edges are rounded up to this multiple (the generator's down-sampling).
    whole_fraction : float
        Larger crops are not worth a batch of their own: the whole tile runs.

    Returns
    -------
    ndarray of int64, shape (ny_tiles, nx_tiles, 4)
        ``(y0, y1, x0, x1)`` in tile coordinates (the whole tile where nothing is blurred).
    """
    cells = _cells_to_refocus(fmap, blur_stops, grow_cells, min_region_cells)
    return _crops_over(cells, fmap.cell_px, plan, multiple_px, whole_fraction)


def _crops_over(
    cells: np.ndarray, cell: int, plan: TilePlan, multiple_px: int, whole_fraction: float
) -> np.ndarray:
    """Crops of the tiles around ``cells`` (:func:`model_crops`)."""
    tile_h, tile_w = plan.tile_hw
    # past the cells' smooth weight (half a cell) and the crop's ramp, whatever the overlap
    context = max(plan.grid.overlap_px, cell)
    ny, nx = plan.origins_y.size, plan.origins_x.size
    crops = np.zeros((ny, nx, 4), dtype=np.int64)
    crops[..., 1], crops[..., 3] = tile_h, tile_w
    y0, y1 = _cell_span(plan.origins_y, tile_h, plan, cell, cells.shape[0])
    x0, x1 = _cell_span(plan.origins_x, tile_w, plan, cell, cells.shape[1])

    def extent(lo_cell: int, hi_cell: int, origin: int, tile: int) -> tuple[int, int]:
        lo = max(0, lo_cell * cell - context - origin)
        hi = min(tile, hi_cell * cell + context - origin)
        length = min(tile, -(-(hi - lo) // multiple_px) * multiple_px)
        hi = min(tile, lo + length)  # rounded up at the end, at the start where the tile ends
        return hi - length, hi

    for i in range(ny):
        for j in range(nx):
            inside = cells[y0[i] : y1[i], x0[j] : x1[j]]
            if not inside.any():
                continue
            rows = np.flatnonzero(inside.any(axis=1))
            cols = np.flatnonzero(inside.any(axis=0))
            cy0, cy1 = extent(y0[i] + rows[0], y0[i] + rows[-1] + 1, int(plan.origins_y[i]), tile_h)
            cx0, cx1 = extent(x0[j] + cols[0], x0[j] + cols[-1] + 1, int(plan.origins_x[j]), tile_w)
            if (cy1 - cy0) * (cx1 - cx0) <= whole_fraction * tile_h * tile_w:
                crops[i, j] = (cy0, cy1, cx0, cx1)
    return crops


def select_tiles(
    fmap: FocusMap, plan: TilePlan, *, blur_stops: float = DEFAULT_BLUR_STOPS, crop: bool
) -> TilePlan:
    """``plan`` with only the tiles over blurred tissue going through the model.

    Parameters
    ----------
    fmap : FocusMap
        The input's focus map.
    plan : TilePlan
        The run's tiles (``tissue``: the tiles over tissue).
    blur_stops : float
        A cell is blurred below a score of ``-blur_stops``.
    crop : bool
        Send only the part of each tile that holds blurred cells (:func:`model_crops`);
        for sessions that take any input shape.

    The plan's ``cells`` are the blurred cells (of regions large enough, grown by a
    cell): the model's output is used near them only, the input elsewhere, also inside
    a refocused tile (:func:`wsi_deepr.tiling.cell_mask_weight`).

    Returns
    -------
    TilePlan
    """
    # the cells of tiles_needing_model and model_crops with their defaults, found once
    cells = _cells_to_refocus(fmap, blur_stops, 1, MIN_REGION_CELLS)
    need = _tiles_over(cells, fmap.cell_px, plan)
    crops = (
        _crops_over(cells, fmap.cell_px, plan, CROP_MULTIPLE_PX, CROP_WHOLE_FRACTION)
        if crop
        else None
    )
    return replace(plan, tissue=plan.tissue & need, crops=crops, cells=cells,
                   cell_px=fmap.cell_px)  # fmt: skip


def _cells_to_refocus(
    fmap: FocusMap, blur_stops: float, grow_cells: int, min_region_cells: int
) -> np.ndarray:
    """Blurred cells of regions large enough, grown (:func:`tiles_needing_model`)."""
    blurred = fmap.blurred(blur_stops)
    if min_region_cells > 1 and blurred.any():
        # Regions joined across one-cell gaps (unjudged glass or fat inside blurred
        # tissue does not split a region), sized by their blurred cells.
        square = np.ones((3, 3), dtype=bool)
        labels, _ = ndimage.label(ndimage.binary_dilation(blurred, structure=square), square)
        sizes = np.bincount(labels[blurred], minlength=labels.max() + 1)
        blurred = (sizes >= min_region_cells)[labels] & blurred
    if grow_cells > 0 and blurred.any():
        blurred = ndimage.binary_dilation(blurred, iterations=grow_cells)
    return np.asarray(blurred, dtype=bool)


def _cell_span(
    origins: np.ndarray, tile: int, plan: TilePlan, cell_px: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cells under each tile's footprint: where its blending weight is not zero."""
    margin = plan.grid.margin_px
    lo = np.clip((origins + margin) // cell_px, 0, n)
    hi = np.clip(-(-(origins + tile - margin) // cell_px), 0, n)
    return lo, np.maximum(hi, lo)


def upsample_cells(cells: np.ndarray, cell_px: int, shape_yx: tuple[int, int]) -> np.ndarray:
    """A cell map repeated to level-0 pixels (cropped to ``shape_yx``)."""
    big = np.repeat(np.repeat(cells, cell_px, axis=0), cell_px, axis=1)
    return big[: shape_yx[0], : shape_yx[1]]


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def coarse_of(fine: np.ndarray) -> np.ndarray:
    """A fine-cell map reduced 2 x 2 to the coarse grid (mean of finite values)."""
    ny, nx = fine.shape
    my, mx = math.ceil(ny / 2), math.ceil(nx / 2)
    padded = np.full((2 * my, 2 * mx), np.nan, dtype=np.float64)
    padded[:ny, :nx] = fine
    blocks = padded.reshape(my, 2, mx, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(blocks, axis=(1, 3)), dtype=np.float32)
