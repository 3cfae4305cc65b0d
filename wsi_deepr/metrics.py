"""Image quality metrics, sharpness and focus criteria of the Deep-R paper.

All images are float arrays ``(c, y, x)`` (or ``(y, x)`` where stated) on a known
intensity scale; every similarity metric takes that scale as ``data_range`` explicitly.

- :func:`ssim`, :func:`ms_ssim`, :func:`rmse`, :func:`psnr`: full-reference quality.
  SSIM is scikit-image's with the settings of Wang et al. (2004): 11x11 Gaussian window,
  sigma 1.5, population covariance. MS-SSIM follows Wang et al. (2003) as implemented by
  ``pytorch_msssim`` (five scales, weights 0.0448 ... 0.1333, valid filtering, 2x2
  average pooling), written here in NumPy so evaluation does not need torch.
- :func:`sobel_sharpness` and :func:`row_sharpness`: the row-wise relative sharpness
  coefficient of eqs. (5)-(7) (OLS without intercept and its standard deviation).
- :func:`focus_vol4`, :func:`focus_vol5`, :func:`focus_std`, :func:`focus_nvar`: the
  focus criteria of eqs. (8)-(12), on ``(y, x)`` images, rows ``m`` along y. Eq. (12)
  prints ``mu`` as a plain sum; the mean intensity is meant (and used) here.
- :func:`fit_gaussian_2d`: least-squares 2D Gaussian fit, giving the FWHM along x and y.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.optimize import least_squares

FloatArray = NDArray[np.floating]

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of MS-SSIM (Wang et al. 2003; tf.image.ssim_multiscale defaults)."""
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""FWHM of a Gaussian in units of its standard deviation (about 2.3548)."""


def _as_cyx(image: FloatArray) -> NDArray[np.float64]:
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected a (c, y, x) or (y, x) image, got shape {arr.shape}")
    return arr


def _check_pair(a: FloatArray, b: FloatArray) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x, y = _as_cyx(a), _as_cyx(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def ssim(image: FloatArray, reference: FloatArray, *, data_range: float) -> float:
    """Structural similarity (mean over channels) of an image against a reference.

    Parameters
    ----------
    image, reference : ndarray of shape (C, Y, X) or (Y, X)
        The images compared, on the same intensity scale.
    data_range : float
        Span of that scale (1.0 for [0, 1] images).

    Returns
    -------
    float
        SSIM in [-1, 1]; 1 for identical images.

    Examples
    --------
    >>> x = np.random.default_rng(0).random((1, 32, 32))
    >>> ssim(x, x, data_range=1.0)
    1.0
    """
    from skimage.metrics import structural_similarity

    x, y = _check_pair(image, reference)
    value = structural_similarity(
        x,
        y,
        data_range=data_range,
        channel_axis=0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    return float(value)


def rmse(image: FloatArray, reference: FloatArray) -> float:
    """Root mean square error over all pixels and channels."""
    x, y = _check_pair(image, reference)
    return float(np.sqrt(np.mean((x - y) ** 2)))


def psnr(image: FloatArray, reference: FloatArray, *, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    error = rmse(image, reference)
    return math.inf if error == 0 else float(20.0 * math.log10(data_range / error))


def _gaussian_window(size: int, sigma: float) -> NDArray[np.float64]:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(image: NDArray[np.float64], window: NDArray[np.float64]) -> NDArray[np.float64]:
    """Separable filtering over (y, x) of a (C, Y, X) array, 'valid' part only."""
    half = window.size // 2
    out = ndi.correlate1d(image, window, axis=1, mode="constant")
    out = ndi.correlate1d(out, window, axis=2, mode="constant")
    return out[:, half : out.shape[1] - half, half : out.shape[2] - half]


def _ssim_and_cs(
    x: NDArray[np.float64], y: NDArray[np.float64], window: NDArray[np.float64], data_range: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel SSIM and contrast-structure terms, shape (C,) each."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x**2
    var_y = _filter_valid(y * y, window) - mu_y**2
    cov = _filter_valid(x * y, window) - mu_x * mu_y
    cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2.0 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))


def _avg_pool2(image: NDArray[np.float64]) -> NDArray[np.float64]:
    """2x2 average pooling; odd axes are zero-padded by one on both sides (as torch)."""
    pad_y, pad_x = image.shape[1] % 2, image.shape[2] % 2
    if pad_y or pad_x:
        image = np.pad(image, ((0, 0), (pad_y, pad_y), (pad_x, pad_x)))
    h, w = image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
    c = image.shape[0]
    return image[:, :h, :w].reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def ms_ssim(
    image: FloatArray,
    reference: FloatArray,
    *,
    data_range: float,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
    window_px: int = 11,
    sigma_px: float = 1.5,
) -> float:
    """Multi-scale structural similarity (mean over channels).

    Parameters
    ----------
    image, reference : ndarray of shape (C, Y, X) or (Y, X)
        The images compared.
    data_range : float
        Span of the intensity scale.
    weights : tuple of float
        Exponent of each scale; its length is the number of scales.
    window_px, sigma_px : int, float
        Gaussian window edge and width.

    Returns
    -------
    float
        MS-SSIM in [0, 1] (negative contrast terms are clipped to 0, as pytorch_msssim).

    Raises
    ------
    ValueError
        If the image is smaller than ``(window_px - 1) * 2 ** (scales - 1)`` + 1 pixels.
    """
    x, y = _check_pair(image, reference)
    min_px = (window_px - 1) * 2 ** (len(weights) - 1)
    if min(x.shape[1:]) <= min_px:
        raise ValueError(f"MS-SSIM with {len(weights)} scales needs images over {min_px} px")
    window = _gaussian_window(window_px, sigma_px)
    factors = []
    for level in range(len(weights)):
        s, cs = _ssim_and_cs(x, y, window, data_range)
        if level < len(weights) - 1:
            factors.append(np.maximum(cs, 0.0))
            x, y = _avg_pool2(x), _avg_pool2(y)
        else:
            factors.append(np.maximum(s, 0.0))
    stacked = np.stack(factors)  # (scales, C)
    per_channel = np.prod(stacked ** np.asarray(weights)[:, None], axis=0)
    return float(per_channel.mean())


def sobel_sharpness(image: FloatArray) -> NDArray[np.float64]:
    """Sharpness map of eq. (5): the Sobel gradient magnitude.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X) or (Y, X)
        Multi-channel images are averaged over channels first.

    Returns
    -------
    ndarray of shape (Y, X)
    """
    arr = np.asarray(image, dtype=np.float64)
    grey = arr.mean(axis=0) if arr.ndim == 3 else arr
    gx = ndi.sobel(grey, axis=1, mode="reflect")
    gy = ndi.sobel(grey, axis=0, mode="reflect")
    return np.asarray(np.hypot(gx, gy))


@dataclass(frozen=True, slots=True)
class RowSharpness:
    """Row-wise relative sharpness of an image against a reference, eqs. (6)-(7)."""

    alpha: NDArray[np.float64]
    """OLS coefficient without intercept per row, shape ``(Y,)``."""
    std: NDArray[np.float64]
    """Its standard deviation per row, shape ``(Y,)``."""


def row_sharpness(image: FloatArray, reference: FloatArray) -> RowSharpness:
    """Relative sharpness of each row of ``image`` with respect to ``reference``.

    With ``S(x)_i`` and ``S(y)_i`` the i-th rows of the Sobel sharpness maps,
    ``alpha_i = S(x)_i . S(y)_i / S(y)_i . S(y)_i`` and
    ``std_i = sqrt(RSS_i / ((N - 1) S(y)_i . S(y)_i))`` with ``N`` the number of samples
    in the regression (the row length; the paper's text says "rows", but the standard
    error of a no-intercept OLS fit uses the samples of the fit).

    Parameters
    ----------
    image, reference : ndarray of shape (C, Y, X) or (Y, X)
        Input or output, and the reference (sharp) image.

    Returns
    -------
    RowSharpness
    """
    sx, sy = sobel_sharpness(image), sobel_sharpness(reference)
    if sx.shape != sy.shape:
        raise ValueError(f"images differ in shape: {sx.shape} vs {sy.shape}")
    denominator = np.maximum(np.einsum("ij,ij->i", sy, sy), np.finfo(np.float64).tiny)
    alpha = np.einsum("ij,ij->i", sx, sy) / denominator
    rss = ((sx - alpha[:, None] * sy) ** 2).sum(axis=1)
    n = sx.shape[1]
    std = np.sqrt(rss / ((n - 1) * denominator))
    return RowSharpness(alpha=alpha, std=std)


def _plane(image: FloatArray) -> NDArray[np.float64]:
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3:
        arr = arr.mean(axis=0)
    if arr.ndim != 2:
        raise ValueError(f"focus criteria take a (y, x) image, got shape {arr.shape}")
    return arr


def focus_vol4(image: FloatArray) -> float:
    """Vollath's F4, eq. (8): autocorrelation at lag 1 minus lag 2 along y."""
    x = _plane(image)
    return float(np.sum(x[:-1] * x[1:]) - np.sum(x[:-2] * x[2:]))


def focus_vol5(image: FloatArray) -> float:
    """Vollath's F5, eq. (9): autocorrelation at lag 1 along y minus ``M N mu^2``."""
    x = _plane(image)
    return float(np.sum(x[:-1] * x[1:]) - x.size * x.mean() ** 2)


def focus_std(image: FloatArray) -> float:
    """Standard deviation of the intensities, eq. (10)."""
    return float(np.std(_plane(image)))


def focus_nvar(image: FloatArray) -> float:
    """Normalised variance, eq. (11): variance divided by the mean intensity."""
    x = _plane(image)
    mu = x.mean()
    return float(np.sum((x - mu) ** 2) / (x.size * mu)) if mu != 0 else 0.0


FOCUS_CRITERIA: dict[str, Callable[[FloatArray], float]] = {
    "VOL4": focus_vol4,
    "VOL5": focus_vol5,
    "STD": focus_std,
    "NVAR": focus_nvar,
}
"""The criteria of Table 1 by name; larger means sharper."""


@dataclass(frozen=True, slots=True)
class GaussianFit:
    """A 2D Gaussian ``offset + amplitude exp(-dx^2/2sx^2 - dy^2/2sy^2)`` fitted to a patch."""

    amplitude: float
    """Peak height above the offset."""
    center_y: float
    """Row of the centre, in pixels of the patch."""
    center_x: float
    """Column of the centre, in pixels of the patch."""
    sigma_y: float
    """Standard deviation along y, pixels."""
    sigma_x: float
    """Standard deviation along x, pixels."""
    offset: float
    """Background level."""
    success: bool
    """Whether the optimiser converged."""

    @property
    def fwhm_y_px(self) -> float:
        """Full width at half maximum along y, pixels."""
        return SIGMA_TO_FWHM * abs(self.sigma_y)

    @property
    def fwhm_x_px(self) -> float:
        """Full width at half maximum along x, pixels."""
        return SIGMA_TO_FWHM * abs(self.sigma_x)

    @property
    def fwhm_px(self) -> float:
        """Lateral FWHM as the paper reports it: the mean of x and y, pixels."""
        return 0.5 * (self.fwhm_x_px + self.fwhm_y_px)


def gaussian_2d(
    yy: FloatArray, xx: FloatArray, params: tuple[float, ...] | FloatArray
) -> NDArray[np.float64]:
    """Evaluate ``(amplitude, cy, cx, sy, sx, offset)`` on coordinate grids."""
    a, cy, cx, sy, sx, off = (float(v) for v in params)
    return np.asarray(
        off + a * np.exp(-((yy - cy) ** 2) / (2 * sy**2) - (xx - cx) ** 2 / (2 * sx**2))
    )


def fit_gaussian_2d(patch: FloatArray) -> GaussianFit:
    """Least-squares fit of an axis-aligned 2D Gaussian with offset (like ``lsqcurvefit``).

    Parameters
    ----------
    patch : ndarray of shape (Y, X)
        A crop around one spot (also used for x-z slices: rows are then z).

    Returns
    -------
    GaussianFit
        Sigmas are bounded to [0.3, 2 x patch size] pixels; a flat (or non-finite) patch
        gives an unsuccessful fit with NaN centre and widths.

    Examples
    --------
    >>> yy, xx = np.mgrid[:31, :31]
    >>> spot = gaussian_2d(yy, xx, (1.0, 15.0, 15.0, 3.0, 3.0, 0.1))
    >>> round(fit_gaussian_2d(spot).fwhm_px, 3)
    7.064
    """
    z = np.asarray(patch, dtype=np.float64)
    h, w = z.shape
    if not np.all(np.isfinite(z)) or float(z.max() - z.min()) <= 1e-12 * max(1.0, abs(z.max())):
        nan = math.nan
        return GaussianFit(0.0, nan, nan, nan, nan, float(np.mean(z)), False)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    offset0 = float(np.percentile(z, 10))
    weights = np.clip(z - offset0, 0, None)
    total = weights.sum()
    if total > 0:
        cy0, cx0 = float((weights * yy).sum() / total), float((weights * xx).sum() / total)
        sy0 = math.sqrt(max(float((weights * (yy - cy0) ** 2).sum() / total), 0.5))
        sx0 = math.sqrt(max(float((weights * (xx - cx0) ** 2).sum() / total), 0.5))
    else:
        cy0, cx0, sy0, sx0 = (h - 1) / 2, (w - 1) / 2, h / 6, w / 6
    amp0 = max(float(z.max()) - offset0, 1e-12)
    start = np.array([amp0, cy0, cx0, min(sy0, h), min(sx0, w), offset0])
    span = max(float(z.max() - z.min()), 1e-12)
    lower = [0.0, -0.5, -0.5, 0.3, 0.3, float(z.min()) - span]
    upper = [10 * span + amp0, h - 0.5, w - 0.5, 2.0 * h, 2.0 * w, float(z.max())]
    width = np.subtract(upper, lower)
    start = np.clip(start, np.add(lower, 1e-6 * width), np.subtract(upper, 1e-6 * width))

    ys, xs = yy.ravel(), xx.ravel()
    target = z.ravel()

    def residual(p: NDArray[np.float64]) -> NDArray[np.float64]:
        a, cy, cx, sy, sx, off = p
        e = np.exp(-((ys - cy) ** 2) / (2 * sy**2) - (xs - cx) ** 2 / (2 * sx**2))
        return np.asarray((off + a * e - target) / span)

    def jacobian(p: NDArray[np.float64]) -> NDArray[np.float64]:
        a, cy, cx, sy, sx, _ = p
        dy, dx = ys - cy, xs - cx
        e = np.exp(-(dy**2) / (2 * sy**2) - dx**2 / (2 * sx**2))
        ae = a * e
        columns = (e, ae * dy / sy**2, ae * dx / sx**2, ae * dy**2 / sy**3, ae * dx**2 / sx**3)
        return np.column_stack([*columns, np.ones_like(e)]) / span

    result = least_squares(
        residual, start, jac=jacobian, bounds=(lower, upper), x_scale="jac", ftol=1e-6, xtol=1e-6
    )
    a, cy, cx, sy, sx, off = (float(v) for v in result.x)
    return GaussianFit(a, cy, cx, sy, sx, off, bool(result.success))
