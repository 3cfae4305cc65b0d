"""Deconvolution baselines of the paper's Fig. 6: Richardson-Lucy and Landweber.

Both are given the true PSF at the image's defocus (which Deep-R never sees) and the
settings the paper reports: Richardson-Lucy 100 iterations (scikit-image's
implementation), Landweber 100 iterations with a gradient step of 0.1. Deconvolution
leaves boundary artefacts; metrics are computed after cropping :data:`BORDER_CROP_PX`
pixels at each edge (:func:`crop_border`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import fft as sp_fft

FloatArray = NDArray[np.floating]

BORDER_CROP_PX = 10
"""Pixels cropped at each image edge before metrics (paper, Methods)."""
RL_ITERATIONS = 100
LANDWEBER_ITERATIONS = 100
LANDWEBER_STEP = 0.1


def _check(image: FloatArray, kernels: list[FloatArray]) -> NDArray[np.float64]:
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"expected a (c, y, x) image, got shape {arr.shape}")
    if len(kernels) != arr.shape[0]:
        raise ValueError(f"need one PSF per channel: {len(kernels)} for {arr.shape[0]}")
    return arr


def richardson_lucy(
    image: FloatArray,
    psfs: list[FloatArray],
    *,
    iterations: int = RL_ITERATIONS,
    pad: bool = True,
) -> NDArray[np.float32]:
    """Richardson-Lucy deconvolution per channel (``skimage.restoration.richardson_lucy``).

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        Blurred, non-negative intensities (linear scale).
    psfs : list of ndarray of shape (K, K)
        One PSF per channel, each summing to 1.
    iterations : int
        Number of iterations.
    pad : bool
        Reflect-pad by the PSF radius first and crop back. scikit-image convolves with
        zeros outside the image, which darkens a band as wide as the PSF along the edges
        of a bright (brightfield) image, far wider than the 10-pixel crop of the metrics.

    Returns
    -------
    ndarray of shape (C, Y, X), float32
        Not clipped (scikit-image's ``clip`` is off so the intensity scale is kept).
    """
    from skimage.restoration import richardson_lucy as skimage_rl

    arr = _check(image, psfs)
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        kernel = np.asarray(psfs[c], dtype=np.float64)
        r = kernel.shape[0] // 2 if pad else 0
        channel = np.clip(arr[c], 0, None)
        if r:
            channel = np.pad(channel, r, mode="reflect" if min(arr.shape[1:]) > r else "edge")
        restored = skimage_rl(channel, kernel, iterations, clip=False)
        out[c] = restored[r : r + arr.shape[1], r : r + arr.shape[2]]
    return out


def _otf(kernel: NDArray[np.float64], shape: tuple[int, int]) -> NDArray[np.complex128]:
    """Transfer function of a centred kernel on a periodic grid of ``shape``."""
    padded = np.zeros(shape, dtype=np.float64)
    k = kernel.shape[0]
    padded[:k, : kernel.shape[1]] = kernel
    padded = np.roll(padded, (-(k // 2), -(kernel.shape[1] // 2)), axis=(0, 1))
    return np.asarray(sp_fft.rfft2(padded))


def landweber(
    image: FloatArray,
    psfs: list[FloatArray],
    *,
    iterations: int = LANDWEBER_ITERATIONS,
    step: float = LANDWEBER_STEP,
) -> NDArray[np.float32]:
    """Landweber deconvolution per channel: ``x <- x + step H^T (y - H x)`` from ``x = y``.

    The convolution is periodic (FFT) on the image reflect-padded by the PSF radius, so
    its borders behave like those of the blur the physics module simulates.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        Blurred intensities.
    psfs : list of ndarray of shape (K, K)
        One PSF per channel.
    iterations : int
        Number of gradient steps.
    step : float
        Gradient step size.

    Returns
    -------
    ndarray of shape (C, Y, X), float32
    """
    arr = _check(image, psfs)
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        kernel = np.asarray(psfs[c], dtype=np.float64)
        pad = kernel.shape[0] // 2
        mode = "reflect" if min(arr.shape[1:]) > pad else "edge"
        y = np.pad(arr[c], pad, mode=mode)  # type: ignore[call-overload]
        shape = (int(y.shape[0]), int(y.shape[1]))
        h = _otf(kernel, shape)
        y_hat = sp_fft.rfft2(y)
        x_hat = y_hat.copy()
        gain = step * np.conj(h)
        for _ in range(iterations):
            x_hat = x_hat + gain * (y_hat - h * x_hat)
        x = sp_fft.irfft2(x_hat, s=shape)
        out[c] = x[pad : pad + arr.shape[1], pad : pad + arr.shape[2]]
    return out


def crop_border(image: FloatArray, border_px: int = BORDER_CROP_PX) -> FloatArray:
    """Drop ``border_px`` pixels at each edge of a ``(c, y, x)`` or ``(y, x)`` image."""
    arr = np.asarray(image)
    if border_px <= 0:
        return arr
    return arr[..., border_px:-border_px, border_px:-border_px]
