"""RL against scikit-image, Landweber against a direct spatial iteration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_deepr import deconvolution, physics


def _blurred(
    shape: tuple[int, int], seed: int, *, defocus_um: float = 1.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sharp = ndi.gaussian_filter(rng.random(shape), 1.0) + 0.2
    kernel = physics.psf(physics.Optics(na=0.75, wavelength_um=0.55, mpp=0.25), defocus_um)
    pad = kernel.shape[0] // 2
    blurred = ndi.convolve(np.pad(sharp, pad, mode="reflect"), kernel)[pad:-pad, pad:-pad]
    return sharp, blurred, kernel


def test_richardson_lucy_is_scikit_images() -> None:
    from skimage.restoration import richardson_lucy

    _, blurred, kernel = _blurred((40, 48), 0)
    ours = deconvolution.richardson_lucy(blurred[None], [kernel], iterations=20, pad=False)
    expected = richardson_lucy(blurred, kernel, 20, clip=False)
    np.testing.assert_allclose(ours[0], expected, rtol=1e-5, atol=1e-6)


def test_richardson_lucy_padding_is_reflect_then_crop() -> None:
    from skimage.restoration import richardson_lucy

    _, blurred, kernel = _blurred((40, 48), 1)
    r = kernel.shape[0] // 2
    ours = deconvolution.richardson_lucy(blurred[None], [kernel], iterations=10)
    expected = richardson_lucy(np.pad(blurred, r, mode="reflect"), kernel, 10, clip=False)
    np.testing.assert_allclose(ours[0], expected[r:-r, r:-r], rtol=1e-5, atol=1e-6)


def test_landweber_matches_a_spatial_loop() -> None:
    _, blurred, kernel = _blurred((30, 34), 2, defocus_um=0.5)
    r = kernel.shape[0] // 2
    y = np.pad(blurred, r, mode="reflect")
    x = y.copy()
    for _ in range(7):  # x <- x + step H^T (y - H x), periodic on the padded grid
        x = x + 0.1 * ndi.correlate(y - ndi.convolve(x, kernel, mode="wrap"), kernel, mode="wrap")
    ours = deconvolution.landweber(blurred[None], [kernel], iterations=7, step=0.1)
    np.testing.assert_allclose(ours[0], x[r:-r, r:-r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["rl", "landweber"])
def test_deconvolution_brings_the_image_closer_to_the_truth(method: str) -> None:
    sharp, blurred, kernel = _blurred((64, 64), 3)
    run = deconvolution.richardson_lucy if method == "rl" else deconvolution.landweber
    restored = run(blurred[None], [kernel])[0]
    crop = deconvolution.crop_border
    before = np.sqrt(np.mean((crop(blurred) - crop(sharp)) ** 2))
    after = np.sqrt(np.mean((crop(restored) - crop(sharp)) ** 2))
    assert after < before


def test_one_psf_per_channel_and_border_crop() -> None:
    with pytest.raises(ValueError, match="one PSF per channel"):
        deconvolution.landweber(np.zeros((2, 8, 8)), [np.ones((3, 3)) / 9])
    assert deconvolution.crop_border(np.zeros((3, 50, 60))).shape == (3, 30, 40)
    assert deconvolution.crop_border(np.zeros((50, 60)), 0).shape == (50, 60)
