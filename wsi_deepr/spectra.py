"""Windowed power spectra of a slide level, measured in one pass over it.

Each cell of a regular grid on level 0 is the centre of a window twice its size
(Hann-tapered, mean removed) whose power spectrum is averaged over annuli of physical
frequency (cycles per micrometre):

- on the *fine* grid (about 16 um cells), the grey image's power in a low band
  (0.05-0.15 cycles/um) and a high band (0.35-0.7 cycles/um), for the focus map
  (:mod:`wsi_deepr.focus`);
- on a *coarse* grid of cells twice as large, each channel's power in 16 log-spaced
  bins up to 0.9 x Nyquist, for the defocus estimate (:mod:`wsi_deepr.defocus_estimate`).

Slides finer than :data:`ANALYSIS_MPP` are measured on integer-reduced pixels (means of
2 x 2 at 0.25 um/px): the bands need no more, and FFT work drops fourfold. Only windows
of tissue cells are measured (background cells keep a NaN ratio and zero power); blocks
of the slide holding tissue are read once each, in threads (FFTs release the GIL), the
others not at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sp_fft

from wsi_deepr.local_dask import SYNC
from wsi_deepr.readers.base import region_source
from wsi_deepr.slide import Slide

CELL_UM = 16.0
"""Target edge of a focus-map cell in micrometres (windows are twice as large)."""


LOW_BAND_PER_UM = (0.05, 0.15)
"""Low band in cycles per micrometre."""
HIGH_BAND_PER_UM = (0.35, 0.7)
"""High band in cycles per micrometre (clipped to 0.8 x Nyquist on coarse scans)."""


SPECTRUM_BINS = 16
"""Frequency bins of the coarse per-channel spectra kept for the defocus estimate."""


@dataclass(frozen=True, slots=True)
class SlideSpectra:
    """What one pass over level 0 measures: band ratios (fine) and spectra (coarse)."""

    cell_px: int
    """Fine cell edge in level-0 pixels; the coarse grid has cells of ``2 * cell_px``."""
    mpp: float
    """Level-0 pixel size in micrometres."""
    analysis_mpp: float
    """Pixel size the spectra were measured at (level 0 reduced by an integer factor)."""
    log2_ratio: np.ndarray
    """``(ny, nx)`` float32 log2(high-band / low-band power) of grey windows; NaN on cells
    not measured (by default those without tissue)."""
    low_power: np.ndarray
    """``(ny, nx)`` float32 low-band power (contrast) of the grey windows; 0 where not
    measured."""
    tissue: np.ndarray
    """``(ny, nx)`` bool, tissue under at least half of the cell (thumbnail mask)."""
    freqs_per_um: np.ndarray
    """``(nb,)`` centres of the coarse spectrum bins."""
    bin_edges_per_um: np.ndarray
    """``(nb + 1,)`` edges of the coarse spectrum bins."""
    log_power: np.ndarray
    """``(my, mx, c, nb)`` float16 natural log of mean power per bin, coarse windows; 0 on
    coarse cells holding no measured fine cell."""


def cell_px_for(mpp: float, cell_um: float = CELL_UM) -> int:
    """Even cell edge in pixels nearest ``cell_um`` (at least 8)."""
    return max(8, 2 * round(cell_um / mpp / 2))


ANALYSIS_MPP = 0.5
"""Slides finer than this are analysed at an integer reduction close to it: the focus
bands end at 0.5 cycles/um and the defocus estimate needs no more, so finer pixels only
cost FFT work (a 2 x 2 mean quarters it at 0.25 um/px)."""


def reduction_for(mpp: float) -> int:
    """Integer factor taking ``mpp`` near :data:`ANALYSIS_MPP` (1 for coarser slides)."""
    return max(1, round(ANALYSIS_MPP / mpp))


def _reduce(region: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return region
    c, h, w = region.shape
    return region.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _grey(raw: np.ndarray, scale: float, factor: int) -> np.ndarray:
    """Channel mean of a ``(c, y, x)`` region as float32 in [0, 1], reduced by ``factor``.

    8-bit pixels are summed over channels in 16-bit integers and converted once (a third
    of the float work of converting every channel of RGB first).
    """
    n_channels = raw.shape[0]
    if raw.dtype == np.uint8 and n_channels <= 257:
        summed = raw[0].astype(np.uint16)
        for channel in raw[1:]:
            summed += channel
        total = summed.astype(np.float32)
    else:
        total = raw[0].astype(np.float32)
        for channel in raw[1:]:
            total += channel
    total *= np.float32(1.0 / (n_channels * scale))
    return _reduce(total[None], factor)[0]


def full_scale_of(dtype: np.dtype) -> float:
    """Full-scale value of a pixel type (1.0 for floats)."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def band_matrix(window_px: int, mpp: float, edges_per_um: np.ndarray) -> np.ndarray:
    """``(window * (window // 2 + 1), n_bands)`` weights averaging an rfft2 power over bands.

    Columns of the half spectrum that stand for two conjugate frequencies count twice.
    """
    fy = np.fft.fftfreq(window_px)[:, None]
    fx = np.fft.rfftfreq(window_px)[None, :]
    radius = np.sqrt(fy**2 + fx**2) / mpp
    twice = np.ones_like(radius)
    twice[:, 1 : (window_px + 1) // 2] = 2.0
    n_bands = len(edges_per_um) - 1
    matrix = np.zeros((radius.size, n_bands), dtype=np.float64)
    flat_r, flat_w = radius.ravel(), twice.ravel()
    for k in range(n_bands):
        inside = (flat_r >= edges_per_um[k]) & (flat_r < edges_per_um[k + 1])
        if inside.any():
            matrix[inside, k] = flat_w[inside] / flat_w[inside].sum()
    return matrix.astype(np.float32)


WINDOW_BATCH_PX = 1 << 20
"""Pixels of the windows :func:`window_band_power` transforms together (4 MiB float32)."""


def window_band_power(
    image: np.ndarray,
    *,
    window_px: int,
    step_px: int,
    bands: np.ndarray,
    select: np.ndarray | None = None,
) -> np.ndarray:
    """Mean power per band of Hann-tapered windows on a regular grid.

    Parameters
    ----------
    image : ndarray of shape (Y, X), float32
        Padded so that window ``(i, j)`` is ``image[i*step : i*step+window, j*step : ...]``.
    window_px, step_px : int
        Window edge and grid step.
    bands : ndarray
        From :func:`band_matrix`.
    select : ndarray of bool, shape (ny, nx), optional
        Measure only these windows of the grid's first ``ny x nx`` (the others are NaN;
        rows with none selected cost nothing). All windows by default.

    Returns
    -------
    ndarray of shape (ny, nx, n_bands), float32
    """
    views = sliding_window_view(image, (window_px, window_px))[::step_px, ::step_px]
    if select is None:
        select = np.ones(views.shape[:2], dtype=bool)
    if select.shape[0] > views.shape[0] or select.shape[1] > views.shape[1]:
        raise ValueError(f"select {select.shape} exceeds the {views.shape[:2]} windows")
    taper = np.outer(np.hanning(window_px), np.hanning(window_px)).astype(np.float32)
    # Each band as (frequencies, weights), summed per window in float64: a window's value
    # does not depend on which others share its batch (a float32 matrix product or SIMD sum
    # rounds by row count and memory alignment), and no BLAS threads contend with the
    # block threads.
    per_band = [(idx, bands[idx, k]) for k in range(bands.shape[1])
                for idx in [np.flatnonzero(bands[:, k])]]  # fmt: skip
    out = np.full((*select.shape, bands.shape[1]), np.nan, dtype=np.float32)
    rows, columns = np.nonzero(select)
    # Selected windows in batches (a copy each): few large array operations, so the
    # scan's block threads share the cores. Every operation is per window: a window's
    # value does not depend on which others share its batch.
    batch = max(1, WINDOW_BATCH_PX // (window_px * window_px))
    for start in range(0, rows.size, batch):
        r, c = rows[start : start + batch], columns[start : start + batch]
        stack = views[r, c]
        stack -= stack.mean(axis=(1, 2), keepdims=True, dtype=np.float32)
        stack *= taper
        spectrum = sp_fft.rfft2(stack, overwrite_x=True)
        power = (spectrum.real**2 + spectrum.imag**2).reshape(stack.shape[0], -1)
        for k, (idx, weights) in enumerate(per_band):
            out[r, c, k] = (power[:, idx] * weights).sum(axis=1, dtype=np.float64)
    return out


def _coarse_cells_of(fine: np.ndarray) -> np.ndarray:
    """Coarse cells (2 x 2 fine cells) holding at least one ``True`` fine cell."""
    ny, nx = fine.shape
    padded = np.zeros((ny + ny % 2, nx + nx % 2), dtype=bool)
    padded[:ny, :nx] = fine
    return np.asarray(padded.reshape(-(-ny // 2), 2, -(-nx // 2), 2).any(axis=(1, 3)))


def _blocks(shape_yx: tuple[int, int], block_px: int) -> Iterator[tuple[int, int, int, int]]:
    height, width = shape_yx
    for y0 in range(0, height, block_px):
        for x0 in range(0, width, block_px):
            yield y0, min(y0 + block_px, height), x0, min(x0 + block_px, width)


def read_padded(data: object, y0: int, y1: int, x0: int, x1: int, halo: int) -> np.ndarray:
    """Level-0 region ``[y0 - halo, y1 + halo) x [x0 - halo, x1 + halo)``, mirrored at edges.

    ``data`` is a ``(c, y, x)`` Dask or NumPy array; ``y1, x1`` may pass its end.
    """
    height, width = int(data.shape[1]), int(data.shape[2])  # type: ignore[attr-defined]
    ry0, ry1 = max(0, y0 - halo), min(height, y1 + halo)
    rx0, rx1 = max(0, x0 - halo), min(width, x1 + halo)
    source = region_source(data)
    if source is not None:  # straight from the file (each file tile decoded once)
        region = source[:, ry0:ry1, rx0:rx1]
    else:
        part = data[:, ry0:ry1, rx0:rx1]  # type: ignore[index]
        # Dask: computed in the calling thread (the scan's block threads are the
        # parallelism; the default scheduler would queue the read on its own pool).
        region = np.asarray(part.compute(scheduler=SYNC) if hasattr(part, "dask") else part)
    pads = ((0, 0), (ry0 - (y0 - halo), (y1 + halo) - ry1), (rx0 - (x0 - halo), (x1 + halo) - rx1))
    if not any(p for axis in pads for p in axis):
        return region
    mode = "symmetric" if min(region.shape[1:]) > max(max(p) for p in pads) else "edge"
    return np.pad(region, pads, mode=mode)  # type: ignore[call-overload, no-any-return]


def scan_slide(
    slide: Slide,
    mask: np.ndarray,
    *,
    data: object | None = None,
    cell_px: int | None = None,
    block_cells: int = 32,
    coarse_spectra: bool = True,
    cells: np.ndarray | None = None,
    workers: int | None = None,
) -> SlideSpectra:
    """One pass over level 0: fine band ratios and coarse per-channel spectra.

    Parameters
    ----------
    slide : Slide
        The slide (its mpp, thumbnail grid and, unless ``data`` is given, its pixels).
    mask : ndarray of bool, shape (Y', X')
        Tissue on the thumbnail grid (:func:`wsi_deepr.tissue.tissue_mask`).
    data : array of shape (C, Y, X), optional
        Other pixels on the same grid (e.g. the refocused level 0) to scan instead.
    cell_px : int, optional
        Fine cell edge in level-0 pixels, a multiple of the reduction
        (:func:`reduction_for`); about 16 um by default.
    block_cells : int
        Coarse cells per block edge read at once (memory: ``(64 * cell_px)^2`` pixels).
    coarse_spectra : bool
        Also measure the per-channel spectra for the defocus estimate (else left zero).
    cells : ndarray of bool, shape (ny, nx), optional
        Fine cells to measure; the tissue cells (:func:`cell_tissue` of ``mask``) by
        default. The others keep a NaN ratio and zero power, and the coarse spectra are
        measured only on coarse cells holding a measured fine cell (zero elsewhere).
        Blocks without one are not read.
    workers : int, optional
        Threads (blocks in parallel); the cores this process may use by default.

    Returns
    -------
    SlideSpectra
    """
    pixels = slide.data if data is None else data
    factor = reduction_for(slide.mpp)
    mpp = slide.mpp * factor  # the analysis grid; cells and blocks stay in level-0 pixels
    cell = cell_px or factor * cell_px_for(mpp)
    if cell % factor:
        raise ValueError(f"cell_px {cell} must be a multiple of the reduction {factor}")
    coarse = 2 * cell
    height, width = slide.shape_yx
    ny, nx = -(-height // cell), -(-width // cell)
    my, mx = -(-height // coarse), -(-width // coarse)
    scale = full_scale_of(np.dtype(pixels.dtype))  # type: ignore[attr-defined]
    nyquist = 0.5 / mpp
    high = (HIGH_BAND_PER_UM[0], min(HIGH_BAND_PER_UM[1], 0.8 * nyquist))
    cell_a, coarse_a = cell // factor, coarse // factor  # on the analysis grid
    fine_bands = band_matrix(2 * cell_a, mpp, np.array([*LOW_BAND_PER_UM, *high]))[:, [0, 2]]
    # Log-spaced: far defocus leaves only the lowest frequencies above the noise.
    edges = np.geomspace(1.5 / (2 * coarse_a * mpp), 0.9 * nyquist, SPECTRUM_BINS + 1)
    coarse_bands = band_matrix(2 * coarse_a, mpp, edges)
    n_channels = int(pixels.shape[0])  # type: ignore[attr-defined]
    tissue = cell_tissue(mask, slide.thumbnail_downsample, (ny, nx), cell)
    measure = tissue if cells is None else np.asarray(cells, dtype=bool)
    if measure.shape != (ny, nx):
        raise ValueError(f"cells must have the fine grid's shape {(ny, nx)}, not {measure.shape}")
    measure_coarse = _coarse_cells_of(measure)[:my, :mx]

    ratio = np.full((ny, nx), np.nan, dtype=np.float32)
    low = np.zeros((ny, nx), dtype=np.float32)
    log_power = np.zeros((my, mx, n_channels, SPECTRUM_BINS), dtype=np.float16)
    halo = coarse // 2  # coarse windows reach half a coarse cell beyond their cell
    block_px = block_cells * coarse

    def scan_block(y0: int, y1: int, x0: int, x1: int) -> None:
        # Whole cells: the block ends on a coarse-cell border past the slide edge.
        y1c, x1c = -(-y1 // coarse) * coarse, -(-x1 // coarse) * coarse
        cy0, cx0 = y0 // cell, x0 // cell
        n_cy, n_cx = (y1c - y0) // cell, (x1c - x0) // cell
        keep_y, keep_x = min(n_cy, ny - cy0), min(n_cx, nx - cx0)
        fine_sel = measure[cy0 : cy0 + keep_y, cx0 : cx0 + keep_x]
        my0, mx0 = y0 // coarse, x0 // coarse
        n_my, n_mx = (y1c - y0) // coarse, (x1c - x0) // coarse
        keep_my, keep_mx = min(n_my, my - my0), min(n_mx, mx - mx0)
        coarse_sel = measure_coarse[my0 : my0 + keep_my, mx0 : mx0 + keep_mx]
        if not fine_sel.any() and not (coarse_spectra and coarse_sel.any()):
            return  # nothing to measure: not even read
        raw = read_padded(pixels, y0, y1c, x0, x1c, halo)
        with_spectra = coarse_spectra and coarse_sel.any()
        if with_spectra:
            region = _reduce(raw.astype(np.float32), factor)
            region /= np.float32(scale)
            grey = region.mean(axis=0)
        else:  # the channel mean only: summed in integers, one conversion to float
            grey = _grey(raw, scale, factor)
        # Fine windows (2 cells) centred on fine cells start half a fine cell before.
        fine_off = (halo - cell // 2) // factor
        g = grey[fine_off:, fine_off:]
        bands = window_band_power(
            g, window_px=2 * cell_a, step_px=cell_a, bands=fine_bands, select=fine_sel
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            block_ratio = np.log2(bands[..., 1] / bands[..., 0])
        # Cells not measured stay as initialised (NaN ratio, zero power).
        ratio[cy0 : cy0 + keep_y, cx0 : cx0 + keep_x][fine_sel] = block_ratio[fine_sel]
        low[cy0 : cy0 + keep_y, cx0 : cx0 + keep_x][fine_sel] = bands[..., 0][fine_sel]
        for c in range(n_channels if with_spectra else 0):
            spec = window_band_power(region[c], window_px=2 * coarse_a, step_px=coarse_a,
                                     bands=coarse_bands, select=coarse_sel)  # fmt: skip
            with np.errstate(divide="ignore"):
                log_power[my0 : my0 + keep_my, mx0 : mx0 + keep_mx, c][coarse_sel] = np.log(
                    np.maximum(spec[coarse_sel], 1e-30)
                )

    # Blocks write disjoint cells; FFTs release the GIL, so threads share the work.
    from wsi_deepr.inference import available_cores

    with ThreadPoolExecutor(max_workers=workers or available_cores()) as pool:
        for future in [pool.submit(scan_block, *b) for b in _blocks((height, width), block_px)]:
            future.result()
    centres = 0.5 * (edges[1:] + edges[:-1])
    return SlideSpectra(cell, slide.mpp, mpp, ratio, low, tissue, centres, edges, log_power)


def cell_tissue(
    mask: np.ndarray, downsample: float, grid_shape: tuple[int, int], cell_px: int
) -> np.ndarray:
    """Cells of a level-0 grid covered at least half by the thumbnail tissue mask."""
    mask = np.asarray(mask, dtype=np.float32)
    ny, nx = grid_shape
    # Sample the mask at a few points per cell (nearest thumbnail pixel).
    sub = 4
    offsets = (np.arange(sub) + 0.5) / sub
    ys = ((np.arange(ny)[:, None] + offsets[None, :]) * cell_px / downsample).astype(np.int64)
    xs = ((np.arange(nx)[:, None] + offsets[None, :]) * cell_px / downsample).astype(np.int64)
    ys = np.clip(ys, 0, mask.shape[0] - 1).ravel()
    xs = np.clip(xs, 0, mask.shape[1] - 1).ravel()
    samples = mask[np.ix_(ys, xs)].reshape(ny, sub, nx, sub)
    return np.asarray(samples.mean(axis=(1, 3)) >= 0.5, dtype=bool)
