"""Where the tissue is, and the slide-level intensity statistics the model is fed with.

Both work on the slide's thumbnail (a low-resolution level, at most ~2048 px on its long
side), so they cost one small read however large the slide is.

Examples
--------
>>> from wsi_deepr.readers import open_slide
>>> from wsi_deepr.tissue import tissue_mask, intensity_stats
>>> slide = open_slide("CMU-1-Small-Region.svs")  # doctest: +SKIP
>>> mask = tissue_mask(slide)  # doctest: +SKIP
>>> mean, std = intensity_stats(slide, mask)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.filters import threshold_otsu

from wsi_deepr.errors import InputError
from wsi_deepr.local_dask import THREADS
from wsi_deepr.readers.base import MAX_FLOAT_VALUE
from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")

SATURATION_THRESHOLD_RANGE = (0.04, 0.15)
"""Bounds on the Otsu threshold of HSV saturation (0..1) for brightfield: below the low
bound is background noise; above the high bound Otsu is splitting tissue from tissue (a
field of view with no background), so everything above it is tissue."""
MIN_CONTRAST = 0.02
"""Fluorescence intensity range (fraction of full scale) below which the slide is blank."""


_THUMBNAILS: OrderedDict[str, np.ndarray] = OrderedDict()
_THUMBNAILS_LOCK = threading.Lock()


def _thumbnail(slide: Slide) -> np.ndarray:
    """The thumbnail in the slide's dtype, computed once for a mask and stats in a row.

    A single-level slide's thumbnail is a block mean of all of level 0: worth keeping.
    Keyed by the Dask name, which is derived from the file, level and shape.
    """
    key = str(slide.thumbnail.name)
    with _THUMBNAILS_LOCK:
        cached = _THUMBNAILS.get(key)
        if cached is not None:
            _THUMBNAILS.move_to_end(key)
            return cached
    image = np.asarray(slide.thumbnail.compute(scheduler=THREADS))
    image.setflags(write=False)
    with _THUMBNAILS_LOCK:
        _THUMBNAILS[key] = image
        while len(_THUMBNAILS) > 2:
            _THUMBNAILS.popitem(last=False)
    return image


def _full_scale(slide: Slide, image: np.ndarray) -> float:
    dtype = slide.thumbnail.dtype
    if np.dtype(dtype).kind in "iu":
        return float(np.iinfo(dtype).max)
    top = float(np.max(image)) if image.size else 1.0
    return top if top > 0 else 1.0


def _brightfield_score(image: np.ndarray, full_scale: float) -> np.ndarray:
    """HSV saturation (0..1) of an RGB (or grey) thumbnail, float32."""
    if image.shape[0] >= 3:
        # max and min in the pixels' own type: a third of the float traffic
        top = image[:3].max(axis=0).astype(np.float32)
        spread = top - image[:3].min(axis=0)
        return np.divide(spread, top, out=np.zeros_like(top), where=top > 0)
    # grey brightfield: darkness is the signal
    return np.float32(1.0) - image[0].astype(np.float32) / np.float32(full_scale)


def _cleanup(mask: np.ndarray) -> np.ndarray:
    """Drop specks, close gaps, fill holes and grow the mask a little.

    Erring towards tissue is cheap (a few more tiles through the model); missing tissue
    leaves it blurred in the output.
    """
    if not mask.any():
        return mask
    area = mask.size
    speck_px = max(4, area // 20_000)
    mask = morphology.remove_small_objects(mask, max_size=speck_px)
    mask = ndimage.binary_closing(mask, structure=morphology.disk(2), border_value=0) | mask
    mask = morphology.remove_small_holes(mask, max_size=max(16, area // 1000))
    return ndimage.binary_dilation(mask, structure=morphology.disk(2))


def _close(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary closing with a disk, via distance transforms (fast for large radii)."""
    grown = ndimage.distance_transform_edt(~mask) <= radius_px
    # pad so that tissue touching the border is not eroded from outside
    padded = np.pad(grown, int(np.ceil(radius_px)) + 1, mode="edge")
    shrunk = ndimage.distance_transform_edt(padded) > radius_px
    pad = int(np.ceil(radius_px)) + 1
    return np.asarray(shrunk[pad:-pad, pad:-pad] | mask, dtype=bool)


def tissue_mask(slide: Slide) -> np.ndarray:
    """Boolean tissue mask on the slide's thumbnail grid.

    Brightfield: Otsu threshold on HSV saturation (bounded to 0.04..0.15). Fluorescence:
    Otsu threshold on the brightest channel. Small objects are removed, holes filled and
    the mask grown by two thumbnail pixels. A blank slide gives an all-False mask.

    Parameters
    ----------
    slide : Slide
        An open slide; its thumbnail is read.

    Returns
    -------
    ndarray of bool, shape (Y', X')
        ``True`` where there is tissue; one element per thumbnail pixel, each spanning
        ``slide.thumbnail_downsample`` level-0 pixels along each axis.
    """
    image = _thumbnail(slide)
    full_scale = _full_scale(slide, image)
    if slide.modality == "brightfield":
        score = ndimage.gaussian_filter(_brightfield_score(image, full_scale), 1.0)
        low, high = SATURATION_THRESHOLD_RANGE
        if float(score.max()) - float(score.min()) < 1e-6:
            threshold = low
        else:
            threshold = min(max(float(threshold_otsu(score)), low), high)
    else:
        score = ndimage.gaussian_filter(image.max(axis=0).astype(np.float64) / full_scale, 1.0)
        lo, hi = np.percentile(score, [1.0, 99.9])
        if hi - lo < MIN_CONTRAST * (1.0 if slide.dtype.kind in "iu" else float(hi or 1.0)):
            return np.zeros(score.shape, dtype=bool)
        # Otsu on log intensity separates dim tissue from the dark background; on linear
        # intensity it splits bright nuclei from dim tissue instead.
        # Signed images (int16, float) may lie below zero: measure from their floor.
        floor = min(0.0, float(score.min()))
        offset = 1e-3 * (float(hi) - floor)
        log_score = np.log(score - floor + offset)
        threshold = float(np.exp(threshold_otsu(log_score))) - offset + floor
    mask = _cleanup(score > threshold)
    if slide.modality == "fluorescence" and mask.any():
        # Join nuclei into tissue: close gaps of up to ~20 um.
        thumb_mpp = slide.mpp * slide.thumbnail_downsample
        radius = max(1.0, 10.0 / thumb_mpp)
        mask = _close(mask, radius)
    LOG.debug("%s: tissue on %.1f%% of the thumbnail", slide.path, 100.0 * mask.mean())
    return np.asarray(mask, dtype=bool)


def intensity_stats(slide: Slide, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over the tissue of the thumbnail.

    These are the slide-level normalisation statistics: every tile is normalised with
    the same numbers, so neighbouring tiles agree in brightness.

    Parameters
    ----------
    slide : Slide
        An open slide; its thumbnail is read.
    mask : ndarray of bool, shape (Y', X'), or None
        Tissue mask on the thumbnail grid (see :func:`tissue_mask`). When it is ``None``
        or selects nothing, all pixels are used.

    Returns
    -------
    mean, std : ndarray of float64, shape (C,)
        In the slide's pixel units. ``std`` is at least half a grey level for integer
        images (1e-6 of the scale for float ones), so dividing by it is safe.

    Raises
    ------
    InputError
        Float pixel values beyond :data:`~wsi_deepr.readers.base.MAX_FLOAT_VALUE`: the
        model works in float32.
    """
    image = _thumbnail(slide)
    peak = float(np.abs(image).max()) if image.size and image.dtype.kind == "f" else 0.0
    if peak > MAX_FLOAT_VALUE:
        raise InputError(
            slide.path,
            f"pixel values reach {peak:.3g}; the model works in float32 and takes values "
            f"up to {MAX_FLOAT_VALUE:.1e}",
            hint="rescale the image",
        )
    c = image.shape[0]
    if mask is not None and mask.shape != image.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} does not match thumbnail {image.shape[1:]}")
    if mask is None or not mask.any():
        pixels = image.reshape(c, -1)
    else:
        pixels = image[:, mask]
    mean = np.empty(c, dtype=np.float64)
    std = np.empty(c, dtype=np.float64)
    for k, channel in enumerate(pixels):
        mean[k], std[k] = _mean_std(channel)
    if slide.dtype.kind in "iu":
        floor = 0.5
    else:
        floor = 1e-6 * max(1.0, float(np.abs(mean).max()) if mean.size else 1.0)
    return mean.astype(np.float64), np.maximum(std, floor).astype(np.float64)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation; exact from a histogram for 8/16-bit."""
    if values.size == 0:
        return float("nan"), float("nan")
    if values.dtype in (np.uint8, np.uint16):
        counts = np.bincount(values.ravel(), minlength=1).astype(np.float64)
        levels = np.arange(counts.size, dtype=np.float64)
        mean = float(counts @ levels) / values.size
        variance = float(counts @ (levels - mean) ** 2) / values.size
        return mean, math.sqrt(variance)
    as_float = values.astype(np.float64)
    return float(as_float.mean()), float(as_float.std())


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction (0..1) of the slide covered by tissue."""
    return float(mask.mean()) if mask.size else 0.0


def region_has_tissue(mask: np.ndarray, slide: Slide, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Whether the level-0 rectangle rows ``y0:y1``, columns ``x0:x1`` touches tissue.

    Parameters
    ----------
    mask : ndarray of bool, shape (Y', X')
        Tissue mask on the thumbnail grid.
    slide : Slide
        The slide the mask belongs to (for ``thumbnail_downsample``).
    y0, y1, x0, x1 : int
        The rectangle in level-0 pixels (end exclusive).

    Returns
    -------
    bool
    """
    ty0, ty1, tx0, tx1 = mask_window(mask.shape, slide.thumbnail_downsample, y0, y1, x0, x1)
    return bool(mask[ty0:ty1, tx0:tx1].any())


def mask_window(
    mask_shape: tuple[int, ...], downsample: float, y0: int, y1: int, x0: int, x1: int
) -> tuple[int, int, int, int]:
    """Thumbnail-grid window ``(ty0, ty1, tx0, tx1)`` covering a level-0 rectangle.

    Rounds outwards, so a rectangle that overlaps a thumbnail pixel by any amount
    includes it; never empty for a non-empty mask.
    """
    th, tw = int(mask_shape[0]), int(mask_shape[1])
    ty0 = min(max(0, math.floor(y0 / downsample)), max(0, th - 1))
    tx0 = min(max(0, math.floor(x0 / downsample)), max(0, tw - 1))
    ty1 = max(ty0 + 1, min(th, math.ceil(y1 / downsample)))
    tx1 = max(tx0 + 1, min(tw, math.ceil(x1 / downsample)))
    return ty0, ty1, tx0, tx1


def mask_to_level0(mask: np.ndarray, slide: Slide, *, block_px: int) -> np.ndarray:
    """Tissue mask on a grid of ``block_px``-sized level-0 blocks (e.g. tiles).

    Parameters
    ----------
    mask : ndarray of bool, shape (Y', X')
        Tissue mask on the thumbnail grid.
    slide : Slide
        The slide the mask belongs to.
    block_px : int
        Edge of one block in level-0 pixels.

    Returns
    -------
    ndarray of bool, shape (ceil(Y / block_px), ceil(X / block_px))
        ``True`` where the block touches tissue.
    """
    h, w = slide.shape_yx
    ny, nx = -(-h // block_px), -(-w // block_px)
    out = np.zeros((ny, nx), dtype=bool)
    for iy in range(ny):
        for ix in range(nx):
            out[iy, ix] = region_has_tissue(
                mask,
                slide,
                iy * block_px,
                min(h, (iy + 1) * block_px),
                ix * block_px,
                min(w, (ix + 1) * block_px),
            )
    return out
