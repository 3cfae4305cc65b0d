"""Metrics against independent references: pytorch_msssim, scikit-image, numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from wsi_deepr import metrics


def _pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = ndi.gaussian_filter(rng.random(shape), (0, 2, 2))
    image = np.clip(reference + 0.05 * rng.standard_normal(shape), 0, 1)
    return image, reference


@pytest.mark.parametrize(("shape", "seed"), [((1, 192, 192), 0), ((3, 200, 176), 1)])
def test_ms_ssim_matches_pytorch_msssim(shape: tuple[int, ...], seed: int) -> None:
    torch = pytest.importorskip("torch")
    from pytorch_msssim import ms_ssim as reference_ms_ssim

    image, reference = _pair(shape, seed)
    expected = float(
        reference_ms_ssim(torch.tensor(image[None]), torch.tensor(reference[None]), data_range=1.0)
    )
    assert metrics.ms_ssim(image, reference, data_range=1.0) == pytest.approx(expected, abs=1e-4)


def test_ms_ssim_identical_is_one_and_rejects_small_images() -> None:
    image, _ = _pair((1, 176, 176), 2)
    assert metrics.ms_ssim(image, image, data_range=1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="160 px"):
        metrics.ms_ssim(image[:, :160, :160], image[:, :160, :160], data_range=1.0)


def test_ssim_uses_the_stated_data_range() -> None:
    image, reference = _pair((1, 64, 64), 3)
    at_one = metrics.ssim(image, reference, data_range=1.0)
    scaled = metrics.ssim(image * 255, reference * 255, data_range=255.0)
    assert at_one == pytest.approx(scaled, abs=1e-9)
    assert metrics.ssim(reference, reference, data_range=1.0) == pytest.approx(1.0)
    assert at_one < 0.99


def test_rmse_and_psnr_against_scikit_image() -> None:
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

    image, reference = _pair((3, 40, 50), 4)
    assert metrics.rmse(image, reference) == pytest.approx(
        math.sqrt(mean_squared_error(reference, image))
    )
    assert metrics.psnr(image, reference, data_range=1.0) == pytest.approx(
        peak_signal_noise_ratio(reference, image, data_range=1.0)
    )
    assert metrics.psnr(image, image, data_range=1.0) == math.inf


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.rmse(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))


def test_row_sharpness_matches_lstsq() -> None:
    rng = np.random.default_rng(5)
    reference = ndi.gaussian_filter(rng.random((24, 40)), 1)
    image = ndi.gaussian_filter(reference, 1.5) + 0.01 * rng.standard_normal((24, 40))
    result = metrics.row_sharpness(image, reference)
    sx, sy = metrics.sobel_sharpness(image), metrics.sobel_sharpness(reference)
    n = sx.shape[1]
    for i in range(sx.shape[0]):
        coef, residual, *_ = np.linalg.lstsq(sy[i][:, None], sx[i], rcond=None)
        assert result.alpha[i] == pytest.approx(coef[0], rel=1e-9)
        # Standard error of a one-regressor OLS fit: sqrt(s^2 (X^T X)^-1), s^2 = RSS / (n-1).
        standard_error = math.sqrt(residual[0] / (n - 1) / float(sy[i] @ sy[i]))
        assert result.std[i] == pytest.approx(standard_error, rel=1e-9)


def test_row_sharpness_of_the_reference_itself_is_one() -> None:
    reference = np.random.default_rng(6).random((3, 16, 20))
    result = metrics.row_sharpness(reference, reference)
    np.testing.assert_allclose(result.alpha, 1.0)
    np.testing.assert_allclose(result.std, 0.0, atol=1e-12)


def test_sobel_sharpness_of_a_ramp() -> None:
    ramp = np.tile(np.arange(12, dtype=float) * 0.5, (10, 1))
    s = metrics.sobel_sharpness(ramp)
    # Sobel = [1 2 1] smoothing x central difference [-1 0 1]: 4 x 2 x slope.
    np.testing.assert_allclose(s[1:-1, 1:-1], 4 * 2 * 0.5)


def _loop_criteria(x: np.ndarray) -> dict[str, float]:
    """Eqs. (8)-(12) as written, with explicit loops (mu the mean intensity)."""
    m_rows, n_cols = x.shape
    mu = sum(x[m, n] for m in range(m_rows) for n in range(n_cols)) / (m_rows * n_cols)
    lag1 = sum(x[m, n] * x[m + 1, n] for m in range(m_rows - 1) for n in range(n_cols))
    lag2 = sum(x[m, n] * x[m + 2, n] for m in range(m_rows - 2) for n in range(n_cols))
    squares = sum((x[m, n] - mu) ** 2 for m in range(m_rows) for n in range(n_cols))
    return {
        "VOL4": lag1 - lag2,
        "VOL5": lag1 - m_rows * n_cols * mu**2,
        "STD": math.sqrt(squares / (m_rows * n_cols)),
        "NVAR": squares / (m_rows * n_cols * mu),
    }


@pytest.mark.parametrize("shape", [(7, 9), (12, 5)])
def test_focus_criteria_match_their_equations(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(7).random(shape) + 0.1
    expected = _loop_criteria(x)
    for name, function in metrics.FOCUS_CRITERIA.items():
        assert function(x) == pytest.approx(expected[name], rel=1e-12), name
        assert function(x[None]) == pytest.approx(expected[name], rel=1e-12), name


def test_focus_criteria_prefer_the_sharp_image() -> None:
    sharp = np.random.default_rng(8).random((32, 32)) + 0.5
    blurred = ndi.gaussian_filter(sharp, 2)
    for name, function in metrics.FOCUS_CRITERIA.items():
        assert function(sharp) > function(blurred), name


@settings(max_examples=25, deadline=None)
@given(
    sigma_y=st.floats(1.0, 5.0),
    sigma_x=st.floats(1.0, 5.0),
    cy=st.floats(12.0, 17.0),
    cx=st.floats(12.0, 17.0),
    offset=st.floats(0.0, 0.3),
)
def test_gaussian_fwhm_recovered_within_two_percent(
    sigma_y: float, sigma_x: float, cy: float, cx: float, offset: float
) -> None:
    yy, xx = np.mgrid[:30, :30]
    patch = offset + np.exp(
        -((yy - cy) ** 2) / (2 * sigma_y**2) - (xx - cx) ** 2 / (2 * sigma_x**2)
    )
    fit = metrics.fit_gaussian_2d(patch)
    fwhm = 2 * math.sqrt(2 * math.log(2))
    assert fit.fwhm_y_px == pytest.approx(fwhm * sigma_y, rel=0.02)
    assert fit.fwhm_x_px == pytest.approx(fwhm * sigma_x, rel=0.02)
    assert fit.fwhm_px == pytest.approx(fwhm * (sigma_x + sigma_y) / 2, rel=0.02)


def test_gaussian_fwhm_with_noise() -> None:
    yy, xx = np.mgrid[:30, :30]
    rng = np.random.default_rng(9)
    patch = 100 + 1000 * np.exp(-((yy - 14.6) ** 2 + (xx - 15.2) ** 2) / (2 * 2.2**2))
    fit = metrics.fit_gaussian_2d(rng.poisson(patch).astype(float))
    assert fit.fwhm_px == pytest.approx(2.3548 * 2.2, rel=0.02)
