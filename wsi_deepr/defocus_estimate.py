"""How far out of focus each region is, in micrometres, and how well that explains it.

What the estimate uses (and what it does not): the slide's *own in-focus tissue* and the
defocus physics of :mod:`wsi_deepr.physics`, not the model. For each coarse cell of
:func:`wsi_deepr.focus.scan_slide` the binned power spectrum of every channel is divided
by the median spectrum of the slide's sharp tissue (cells scoring above
:data:`SHARP_SCORE`). Blurring an in-focus image by the PSF at defocus ``z`` multiplies
its power spectrum by ``|OTF_z(f)|^2``, so that ratio is compared with ``|OTF_z|^2`` of
the pupil model (the slide's mpp, the model card's NA, the brightfield R/G/B wavelengths
or the fluorescence emission wavelength) for candidate ``z`` in 0-12 um, allowing a free
scale per channel (tissue content differs between cells) and flooring both at
:data:`FLOOR` (noise and compression fill the spectrum below it). The best ``z`` is
refined by a parabola through the cost minimum.

- Only ``|z|`` is estimated: without spherical aberration the PSF at ``+z`` and ``-z`` is
  the same, and a single image cannot tell them apart.
- The spectrum ratio assumes that the cell's tissue, in focus, would have the spectrum of
  the slide's sharp tissue up to a scale. Tissue unlike the rest of the slide biases the
  estimate; :attr:`DefocusMap.fit_rms_db` (the misfit) is large where no defocus explains
  the spectrum (folds, pen marks, debris, or structure a model invented).
- The reference is the slide's in-focus tissue as scanned, so the estimate is the defocus
  *in addition to* that state, as :func:`wsi_deepr.physics.defocus_image` simulates it.

With a refocused output, :func:`reblur_residual` checks the output against the input:
re-blurred by the PSF at the estimated defocus it should reproduce the input. The part of
the input it does not explain is the residual, a guard against hallucinated structure. It
sees only structure coarse enough to survive that blur: anything finer is erased by the
re-blur whether it is real or invented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

from wsi_deepr.focus import FocusMap, coarse_of
from wsi_deepr.physics import Optics, psf, with_mpp
from wsi_deepr.spectra import SlideSpectra, band_matrix, read_padded

Z_MAX_UM = 12.0
"""Largest defocus considered."""
Z_STEP_UM = 0.5
"""Spacing of the candidate defocus values (refined by a parabola)."""
FLOOR = 1e-3
"""Power ratio (-30 dB) below which the spectrum is taken as noise on both sides."""
SHARP_SCORE = -1.0
"""Focus score (stops) above which a coarse cell counts as in focus for the reference."""
UNEXPLAINED_DB = 4.0
"""Fit misfit (RMS over bins, dB) above which a cell counts as unexplained by defocus."""
RESIDUAL_FLAG = 1.5
"""A refocused cell is flagged when its output, re-blurred, explains the input this many
times worse than the unchanged input re-blurred does (a no-op model scores 1, the true
in-focus image far below 1)."""


@dataclass(frozen=True, slots=True)
class DefocusMap:
    """Estimated defocus on the coarse grid (cells of ``2 x`` the focus-map cell)."""

    cell_px: int
    """Edge of one coarse cell in level-0 pixels."""
    mpp: float
    """Level-0 pixel size in micrometres."""
    defocus_um: np.ndarray
    """``(my, mx)`` float32 estimated ``|z|`` in micrometres (NaN where not estimated)."""
    fit_rms_db: np.ndarray
    """``(my, mx)`` float32 RMS misfit of the spectrum ratio to ``|OTF_z|^2``, in dB."""
    reference_cells: int
    """Sharp tissue cells that made the reference spectrum."""


def candidate_z() -> np.ndarray:
    """Candidate defocus values, 0 to :data:`Z_MAX_UM` by :data:`Z_STEP_UM`."""
    return np.arange(0.0, Z_MAX_UM + 1e-9, Z_STEP_UM)


@lru_cache(maxsize=16)
def _otf_table(optics: Optics, edges: tuple[float, ...]) -> np.ndarray:
    """``(n_z, n_bins)`` mean ``|OTF_z|^2`` of one channel over the spectrum bins."""
    zs = candidate_z()
    kernels = [psf(optics, float(z)) for z in zs]
    n = sp_fft.next_fast_len(max(256, max(k.shape[0] for k in kernels)))
    bands = band_matrix(n, optics.mpp, np.asarray(edges))
    table = np.empty((zs.size, len(edges) - 1), dtype=np.float64)
    for i, kernel in enumerate(kernels):
        spectrum = sp_fft.rfft2(kernel, s=(n, n))
        table[i] = (np.abs(spectrum) ** 2).reshape(-1) @ bands
    return table


def otf_table(optics: Sequence[Optics], edges_per_um: np.ndarray) -> np.ndarray:
    """``(n_z, c, n_bins)`` mean ``|OTF_z|^2`` per channel over the spectrum bins."""
    key = tuple(float(e) for e in edges_per_um)
    return np.stack([_otf_table(o, key) for o in optics], axis=1)


def estimate_defocus(
    spectra: SlideSpectra, fmap: FocusMap, optics: Sequence[Optics], *, chunk: int = 2048
) -> DefocusMap:
    """Per coarse cell, the ``|z|`` whose ``|OTF_z|^2`` best explains the spectrum ratio.

    Parameters
    ----------
    spectra : SlideSpectra
        From :func:`wsi_deepr.focus.scan_slide` (the input slide).
    fmap : FocusMap
        Its focus map: sharp tissue cells make the reference spectrum.
    optics : sequence of Optics
        One per channel, at the slide's mpp (see :func:`wsi_deepr.physics.brightfield_optics`).
    chunk : int
        Cells fitted at once (memory).

    Returns
    -------
    DefocusMap
        NaN outside judged tissue, or everywhere if the slide has no sharp tissue.
    """
    log_power = spectra.log_power.astype(np.float32)
    my, mx, n_channels, n_bins = log_power.shape
    score = coarse_of(fmap.score)[:my, :mx]
    judged = np.isfinite(score)
    sharp = judged & (score >= SHARP_SCORE)
    z_map = np.full((my, mx), np.nan, dtype=np.float32)
    rms_map = np.full((my, mx), np.nan, dtype=np.float32)
    if not sharp.any():
        return DefocusMap(2 * spectra.cell_px, spectra.mpp, z_map, rms_map, 0)
    reference = np.median(log_power[sharp], axis=0)  # (c, nb)
    # The spectra were measured on a grid reduced by an integer factor: the PSF is
    # integrated over those pixels.
    at_analysis = with_mpp(optics, spectra.analysis_mpp)
    table = otf_table(at_analysis, spectra.bin_edges_per_um)  # (nz, c, nb)
    model = np.log(table + FLOOR).astype(np.float32)
    zs = candidate_z()
    log_floor = np.float32(math.log(FLOOR))
    cells = np.flatnonzero(judged.ravel())
    flat = log_power.reshape(-1, n_channels, n_bins)
    for start in range(0, cells.size, chunk):
        index = cells[start : start + chunk]
        ratio = (flat[index] - reference)[:, None]  # (n, 1, c, nb)
        offset = (ratio - model).mean(axis=-1, keepdims=True)
        for _ in range(2):  # below the floor, observed and model both read as noise
            clipped = np.maximum(ratio, offset + log_floor)
            offset = (clipped - model).mean(axis=-1, keepdims=True)
        misfit = clipped - model - offset
        cost = (misfit**2).mean(axis=(-1, -2))  # (n, nz)
        best = np.argmin(cost, axis=1)
        z_map.ravel()[index] = _refine(zs, cost, best)
        rms = np.sqrt(cost[np.arange(index.size), best])
        rms_map.ravel()[index] = 10.0 / math.log(10.0) * rms
    return DefocusMap(2 * spectra.cell_px, spectra.mpp, z_map, rms_map, int(sharp.sum()))


def _refine(zs: np.ndarray, cost: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through the cost at ``best`` and its neighbours."""
    i = np.clip(best, 1, zs.size - 2)
    rows = np.arange(cost.shape[0])
    left, mid, right = cost[rows, i - 1], cost[rows, i], cost[rows, i + 1]
    curvature = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curvature > 0, 0.5 * (left - right) / curvature, 0.0)
    z = zs[i] + np.clip(shift, -1.0, 1.0) * (zs[1] - zs[0])
    z = np.where((best == 0) | (best == zs.size - 1), zs[best], z)
    return np.clip(z, 0.0, zs[-1]).astype(np.float32)


def region_summary(
    blurred: np.ndarray, fmap: FocusMap, dmap: DefocusMap | None, *, max_regions: int = 50
) -> list[dict[str, float | int | list[float]]]:
    """Connected blurred regions of the focus map, largest first, with their defocus.

    The defocus of a region is the median over its coarse cells whose four focus cells
    are all blurred (cells on its edge mix in sharp tissue).

    Parameters
    ----------
    blurred : ndarray of bool, shape (ny, nx)
        Blurred focus cells (:meth:`FocusMap.blurred`).
    fmap, dmap : FocusMap, DefocusMap
        The maps of the same slide.
    max_regions : int
        Report at most this many (the largest).

    Returns
    -------
    list of dict
        ``area_mm2``, ``centroid_um`` (y, x), ``bbox_px`` (y0, x0, y1, x1),
        ``defocus_um`` (median), ``defocus_um_p10``/``p90``, ``fit_rms_db``, ``cells``.
    """
    labels, n = ndimage.label(blurred)
    if n == 0:
        return []
    cell_um = fmap.cell_px * fmap.mpp
    out: list[dict[str, float | int | list[float]]] = []
    sizes = np.bincount(labels.ravel())[1:]
    for k in np.argsort(-sizes)[:max_regions]:
        region = labels == k + 1
        ys, xs = np.nonzero(region)
        entry: dict[str, float | int | list[float]] = {
            "cells": int(region.sum()),
            "area_mm2": float(region.sum()) * (cell_um * 1e-3) ** 2,
            "centroid_um": [float((ys.mean() + 0.5) * cell_um), float((xs.mean() + 0.5) * cell_um)],
            "bbox_px": [int(ys.min()) * fmap.cell_px, int(xs.min()) * fmap.cell_px,
                        int(ys.max() + 1) * fmap.cell_px, int(xs.max() + 1) * fmap.cell_px],
        }  # fmt: skip
        if dmap is None:
            out.append(entry)
            continue
        my, mx = dmap.defocus_um.shape
        core = _all2x2(region)[:my, :mx] & np.isfinite(dmap.defocus_um)
        if not core.any():
            core = (coarse_of(region.astype(np.float32))[:my, :mx] > 0) & np.isfinite(
                dmap.defocus_um
            )
        z = dmap.defocus_um[core]
        if z.size:
            entry["defocus_um"] = float(np.median(z))
            entry["defocus_um_p10"] = float(np.percentile(z, 10))
            entry["defocus_um_p90"] = float(np.percentile(z, 90))
            entry["fit_rms_db"] = float(np.median(dmap.fit_rms_db[core]))
        out.append(entry)
    return out


def _all2x2(fine: np.ndarray) -> np.ndarray:
    ny, nx = fine.shape
    padded = np.zeros((ny + ny % 2, nx + nx % 2), dtype=bool)
    padded[:ny, :nx] = fine
    return np.asarray(padded.reshape(padded.shape[0] // 2, 2, -1, 2).all(axis=(1, 3)))


def reblur_residual(
    input_data: object,
    output_data: object,
    dmap: DefocusMap,
    optics: Sequence[Optics],
    *,
    cells: np.ndarray,
    full_scale: float,
    block_cells: int = 16,
) -> np.ndarray:
    """How much of the input the refocused output, re-blurred, fails to explain.

    For each selected coarse cell: blur the output by the PSF at the cell's estimated
    defocus, per channel, and compare it with the input over the cell:
    ``RMS(input - PSF_z * output) / RMS(input - mean(input))``, averaged over channels.
    About 0 when the output is the in-focus image the input was blurred from; large where
    the output holds structure that no blur of it turns into the input.

    Parameters
    ----------
    input_data, output_data : arrays of shape (C, Y, X)
        Level 0 of the input and of the refocused output (Dask, zarr or NumPy).
    dmap : DefocusMap
        Estimated defocus of the input.
    optics : sequence of Optics
        One per channel.
    cells : ndarray of bool, shape (my, mx)
        Coarse cells to check (e.g. blurred cells whose tiles went through the model).
    full_scale : float
        Full-scale pixel value (255 for 8-bit).
    block_cells : int
        Cells per block edge read at once.

    Returns
    -------
    ndarray of shape (my, mx), float32
        NaN for cells not checked.
    """
    out = np.full(dmap.defocus_um.shape, np.nan, dtype=np.float32)
    cell = dmap.cell_px
    selected = cells & np.isfinite(dmap.defocus_um)
    z_cells = np.round(dmap.defocus_um / Z_STEP_UM) * Z_STEP_UM
    halo = max(psf(o, Z_MAX_UM).shape[0] for o in optics) // 2
    # Read blocks of cells once (with a halo for the blur), not every cell on its own.
    for bi in range(0, selected.shape[0], block_cells):
        for bj in range(0, selected.shape[1], block_cells):
            block = selected[bi : bi + block_cells, bj : bj + block_cells]
            if not block.any():
                continue
            y0, x0 = bi * cell, bj * cell
            y1, x1 = y0 + block.shape[0] * cell, x0 + block.shape[1] * cell
            seen = read_padded(input_data, y0, y1, x0, x1, 0).astype(np.float32)
            source = read_padded(output_data, y0, y1, x0, x1, halo).astype(np.float32)
            seen /= np.float32(full_scale)
            source /= np.float32(full_scale)
            for i, j in zip(*np.nonzero(block), strict=True):
                z = float(z_cells[bi + i, bj + j])
                ys, xs = i * cell, j * cell
                out[bi + i, bj + j] = _cell_residual(
                    seen[:, ys : ys + cell, xs : xs + cell],
                    source[:, ys : ys + cell + 2 * halo, xs : xs + cell + 2 * halo],
                    [psf(o, z) for o in optics],
                    halo,
                )
    return out


def _cell_residual(
    seen: np.ndarray, source: np.ndarray, kernels: list[np.ndarray], halo: int
) -> float:
    """Residual of one cell: ``seen (c, n, n)``, ``source`` the output with ``halo``."""
    cell = seen.shape[1]
    fractions = []
    for c, kernel in enumerate(kernels):
        src = source[c]
        blurred = sp_fft.irfft2(sp_fft.rfft2(src) * sp_fft.rfft2(kernel, s=src.shape), s=src.shape)
        # Circular convolution: output n is centred on source pixel n - k // 2, so the
        # cell (source pixels halo ... halo + cell) starts at halo + k // 2.
        start = halo + kernel.shape[0] // 2
        reblurred = blurred[start : start + cell, start : start + cell]
        spread = float(np.sqrt(np.mean((seen[c] - seen[c].mean()) ** 2)))
        error = float(np.sqrt(np.mean((seen[c] - reblurred) ** 2)))
        fractions.append(error / max(spread, 1e-6))
    return float(np.mean(fractions))
