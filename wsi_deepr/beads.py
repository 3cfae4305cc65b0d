"""Bead PSF analysis (the paper's Fig. 5b): lateral FWHM of isolated beads against z.

As in the paper's Methods: the most focused plane of a stack is the one with the largest
standard deviation; a threshold on it gives connected components; a square crop
(30 x 30 pixels by default) around each component's centroid is followed through the
stack, and a 2D Gaussian is fitted on every plane, the lateral FWHM being the mean of the
x and y FWHM. Dirt and clusters are excluded using the statistics of the *input* FWHM at
the focused plane: a bead whose in-focus FWHM lies more than ``k`` robust standard
deviations (1.4826 x MAD) from the median is dropped, as is any crop holding a second
component or touching the image border.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from wsi_deepr.metrics import fit_gaussian_2d

FloatArray = NDArray[np.floating]

CROP_PX = 30
"""Edge of the crop around each bead (paper: 30 x 30 pixels)."""
MIN_RELATIVE_AMPLITUDE = 0.05
"""A plane's fit counts only if its peak is at least this share of the bead's brightest."""


def focused_plane(stack: FloatArray) -> int:
    """Index of the plane with the largest standard deviation in a ``(Z, Y, X)`` stack."""
    arr = np.asarray(stack, dtype=np.float64)
    return int(np.argmax(arr.reshape(arr.shape[0], -1).std(axis=1)))


@dataclass(frozen=True, slots=True)
class Bead:
    """One candidate bead found on the focused plane."""

    center_yx: tuple[float, float]
    """Centroid of its component, pixels."""
    origin_yx: tuple[int, int]
    """Top-left corner of its crop."""
    isolated: bool
    """The crop lies inside the image and holds no other component."""


def detect_beads(
    plane: FloatArray, *, crop_px: int = CROP_PX, threshold_sigmas: float = 3.0
) -> list[Bead]:
    """Beads on one plane: threshold at ``mean + k std``, then connected components.

    Parameters
    ----------
    plane : ndarray of shape (Y, X)
        The most focused plane.
    crop_px : int
        Edge of the crop each bead gets.
    threshold_sigmas : float
        ``k`` of the threshold.

    Returns
    -------
    list of Bead
        In label order; components of a single pixel are ignored (hot pixels).
    """
    p = np.asarray(plane, dtype=np.float64)
    labels, n = ndi.label(p > p.mean() + threshold_sigmas * p.std())
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    sizes = ndi.sum_labels(np.ones_like(p), labels, index)
    centers = ndi.center_of_mass(p, labels, index)
    beads = []
    h, w = p.shape
    for label, size, (cy, cx) in zip(index, sizes, centers, strict=True):
        if size < 2:
            continue
        y0, x0 = round(cy) - crop_px // 2, round(cx) - crop_px // 2
        inside = y0 >= 0 and x0 >= 0 and y0 + crop_px <= h and x0 + crop_px <= w
        window = labels[max(y0, 0) : y0 + crop_px, max(x0, 0) : x0 + crop_px]
        others = np.setdiff1d(np.unique(window), [0, label])
        others = others[sizes[others - 1] >= 2] if others.size else others
        beads.append(Bead((float(cy), float(cx)), (y0, x0), inside and others.size == 0))
    return beads


def lateral_fwhm_px(
    stack: FloatArray, bead: Bead, *, crop_px: int = CROP_PX
) -> NDArray[np.float64]:
    """Lateral FWHM (mean of x and y, pixels) of one bead on every plane.

    Parameters
    ----------
    stack : ndarray of shape (Z, Y, X)
        Input or output stack (same geometry as where the bead was found).
    bead : Bead
        Where to crop.
    crop_px : int
        Crop edge.

    Returns
    -------
    ndarray of shape (Z,)
        NaN where the fit failed, its centre strayed more than a quarter crop from the
        crop's centre, its FWHM exceeds half the crop, or its peak is below
        :data:`MIN_RELATIVE_AMPLITUDE` of the bead's brightest plane.
    """
    y0, x0 = bead.origin_yx
    crops = np.asarray(stack, dtype=np.float64)[:, y0 : y0 + crop_px, x0 : x0 + crop_px]
    out = np.full(crops.shape[0], np.nan)
    amplitude = np.zeros(crops.shape[0])
    middle = (crop_px - 1) / 2.0
    for k, crop in enumerate(crops):
        fit = fit_gaussian_2d(crop)
        # A fit is kept only while it still tracks the bead: centre near the crop's centre
        # and a width the crop can hold; otherwise the spot has spread beyond the crop.
        tracked = max(abs(fit.center_y - middle), abs(fit.center_x - middle)) <= crop_px / 4
        if fit.success and tracked and fit.fwhm_px < crop_px / 2:
            out[k], amplitude[k] = fit.fwhm_px, fit.amplitude
    # Far from focus a fit can lock onto noise: require some of the peak's brightness.
    out[amplitude < MIN_RELATIVE_AMPLITUDE * amplitude.max()] = np.nan
    return out


@dataclass(frozen=True, slots=True)
class BeadAnalysis:
    """Lateral FWHM against z of the beads kept after exclusion."""

    z_um: NDArray[np.float64]
    """Height of each plane relative to the focused plane, shape ``(Z,)``."""
    focus_index: int
    """Index of the focused plane of the input."""
    beads: list[Bead]
    """The isolated beads found on the focused plane."""
    kept: NDArray[np.bool_]
    """Which beads survived the exclusion, shape ``(B,)``."""
    fwhm_px: dict[str, NDArray[np.float64]]
    """Per stack name (``"input"``, ``"output"`` ...), FWHM ``(B, Z)`` of all beads."""

    def mean_std(self, name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Mean and standard deviation over the kept beads, per plane."""
        values = self.fwhm_px[name][self.kept]
        if values.size == 0:
            nan = np.full(self.z_um.shape, np.nan)
            return nan, nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # planes where every fit failed
            return np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def exclude_outliers(in_focus_fwhm_px: FloatArray, *, k: float = 3.0) -> NDArray[np.bool_]:
    """Keep beads whose in-focus input FWHM is within ``k`` robust std of the median.

    Parameters
    ----------
    in_focus_fwhm_px : ndarray of shape (B,)
        Input FWHM of each bead at the focused plane (NaN: the fit failed).
    k : float
        Width of the accepted band in robust standard deviations.

    Returns
    -------
    ndarray of shape (B,), bool
    """
    values = np.asarray(in_focus_fwhm_px, dtype=np.float64)
    ok = np.isfinite(values)
    if ok.sum() < 3:
        return ok
    median = float(np.median(values[ok]))
    spread = 1.4826 * float(np.median(np.abs(values[ok] - median)))
    spread = max(spread, 0.05 * median)
    return np.asarray(ok & (np.abs(values - median) <= k * spread))


def analyse_beads(
    stacks: dict[str, FloatArray],
    *,
    z_step_um: float,
    crop_px: int = CROP_PX,
    threshold_sigmas: float = 3.0,
    exclusion_k: float = 3.0,
) -> BeadAnalysis:
    """Find beads on the input's focused plane and measure FWHM against z in every stack.

    Parameters
    ----------
    stacks : dict of str to ndarray of shape (Z, Y, X)
        Must hold ``"input"``; other entries (model outputs, deconvolutions) share its
        geometry.
    z_step_um : float
        Axial spacing of the planes.
    crop_px, threshold_sigmas, exclusion_k : int, float, float
        See :func:`detect_beads` and :func:`exclude_outliers`.

    Returns
    -------
    BeadAnalysis
    """
    if "input" not in stacks:
        raise ValueError("stacks must include 'input'")
    source = np.asarray(stacks["input"], dtype=np.float64)
    focus = focused_plane(source)
    beads = detect_beads(source[focus], crop_px=crop_px, threshold_sigmas=threshold_sigmas)
    isolated = [b for b in beads if b.isolated]
    fwhm: dict[str, NDArray[np.float64]] = {}
    for name, stack in stacks.items():
        rows = [lateral_fwhm_px(stack, b, crop_px=crop_px) for b in isolated]
        fwhm[name] = np.asarray(rows).reshape(len(isolated), source.shape[0])
    kept = exclude_outliers(fwhm["input"][:, focus], k=exclusion_k)
    z_um = (np.arange(source.shape[0]) - focus) * float(z_step_um)
    return BeadAnalysis(np.asarray(z_um, dtype=np.float64), focus, isolated, kept, fwhm)
