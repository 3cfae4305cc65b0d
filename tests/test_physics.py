"""Defocus physics against independent references (Airy pattern, Gibson-Lanni PSF)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from wsi_deepr.physics import (
    Optics,
    add_poisson_gaussian_noise,
    brightfield_optics,
    defocus_image,
    jpeg_roundtrip,
    psf,
    tilt_defocus_map,
)


def _fwhm_um(kernel: np.ndarray, mpp: float) -> float:
    """FWHM of the central row, by linear interpolation of the half-maximum crossing."""
    c = kernel.shape[0] // 2
    profile = kernel[c] / kernel[c].max()
    i = c
    while profile[i + 1] >= 0.5:
        i += 1
    crossing = i + (profile[i] - 0.5) / (profile[i] - profile[i + 1])
    return 2 * (crossing - c) * mpp


def _radius_holding(kernel: np.ndarray, mpp: float, fraction: float) -> float:
    n = kernel.shape[0]
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(yy, xx).ravel() * mpp
    order = np.argsort(r)
    energy = np.cumsum(kernel.ravel()[order])
    return float(r[order][np.searchsorted(energy, fraction)])


@pytest.mark.parametrize(("na", "wavelength_um"), [(0.75, 0.55), (0.95, 0.52), (0.4, 0.65)])
def test_in_focus_fwhm_matches_airy(na: float, wavelength_um: float) -> None:
    mpp = wavelength_um / na / 40  # fine sampling of the Airy disc
    kernel = psf(Optics(na, wavelength_um, mpp), 0.0, size_px=161)
    airy_fwhm_um = 0.51 * wavelength_um / na
    assert _fwhm_um(kernel, mpp) == pytest.approx(airy_fwhm_um, rel=0.05)


@pytest.mark.parametrize("defocus_um", [0.0, 1.5, -4.0, 10.0])
def test_psf_integrates_to_one_and_is_non_negative(defocus_um: float) -> None:
    kernel = psf(Optics(0.75, 0.55, 0.25), defocus_um)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-9)
    assert kernel.min() >= 0.0
    assert kernel.shape[0] % 2 == 1


def test_blur_grows_monotonically_beyond_depth_of_field() -> None:
    optics = Optics(0.75, 0.55, 0.25)
    radii = [
        _radius_holding(psf(optics, z, size_px=201), optics.mpp, 0.8)
        for z in np.arange(1.0, 10.5, 0.5)
    ]
    assert all(b > a for a, b in itertools.pairwise(radii))
    # Geometric optics: a uniform pupil puts a fraction q of the energy inside the rays
    # with sin(theta) <= sqrt(q) NA, which land at r = z tan(theta).
    geometric_80_um = 10.0 * np.tan(np.arcsin(np.sqrt(0.8) * optics.na))
    assert radii[-1] == pytest.approx(geometric_80_um, rel=0.07)
    assert radii[-1] < optics.blur_radius_um(10.0)


def test_spherical_aberration_breaks_the_plus_minus_symmetry() -> None:
    plain = Optics(0.75, 0.55, 0.25)
    aberrated = Optics(0.75, 0.55, 0.25, spherical_waves=0.5)
    for z in (1.0, 3.0):
        same = np.abs(psf(plain, z, size_px=101) - psf(plain, -z, size_px=101)).max()
        differ = np.abs(psf(aberrated, z, size_px=101) - psf(aberrated, -z, size_px=101)).max()
        assert same < 1e-12
        assert differ > 1e-3


def test_psf_agrees_with_gibson_lanni_scalar_model() -> None:
    """psfmodels' scalar Gibson-Lanni PSF with matched (dry, index-matched) optics."""
    psfmodels = pytest.importorskip("psfmodels")
    mpp, n_px = 0.1, 101
    for z in (0.0, 1.0, 2.0, 4.0):
        reference = psfmodels.make_psf(
            [z],
            n_px,
            dxy=mpp,
            NA=0.75,
            wvl=0.55,
            ns=1.0,
            ni=1.0,
            ni0=1.0,
            ng=1.0,
            ng0=1.0,
            model="scalar",
        )[0]
        reference = reference / reference.sum()
        ours = psf(Optics(0.75, 0.55, mpp), z, size_px=n_px)
        assert np.corrcoef(reference.ravel(), ours.ravel())[0, 1] > 0.999
        assert _radius_holding(ours, mpp, 0.5) == pytest.approx(
            _radius_holding(reference, mpp, 0.5), rel=0.05
        )


def test_uniform_defocus_preserves_mean_and_lowers_contrast() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((3, 128, 128)).astype(np.float32)
    blurred = defocus_image(image, 3.0, optics=brightfield_optics(0.75, 0.25))
    assert blurred.shape == image.shape
    assert blurred.mean() == pytest.approx(image.mean(), abs=0.01)
    assert blurred.std() < 0.5 * image.std()


def test_defocus_map_matches_uniform_where_flat_and_varies_along_tilt() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((1, 96, 96)).astype(np.float32)
    optics = (Optics(0.75, 0.55, 0.25),)
    flat = np.full((96, 96), 2.0)
    # a map with equal values gives the uniform result
    flat[0, 0] = 2.0001
    mapped = defocus_image(image, flat, optics=optics)
    uniform = defocus_image(image, 2.0, optics=optics)
    assert np.abs(mapped - uniform)[:, 10:-10, 10:-10].max() < 2e-3
    tilt = tilt_defocus_map((96, 96), mpp=0.25, tilt_deg=20.0, center_defocus_um=0.0)
    assert tilt[0, 0] == pytest.approx(-tilt[-1, 0])
    assert tilt[-1, 0] - tilt[0, 0] == pytest.approx(95 * 0.25 * np.tan(np.radians(20.0)))
    tilted = defocus_image(image, tilt, optics=optics)
    # rows near the focal line keep more contrast than rows at the ends
    assert tilted[0, 44:52].std() > tilted[0, :8].std()


def test_poisson_gaussian_noise_has_the_predicted_variance() -> None:
    rng = np.random.default_rng(2)
    image = np.full((1, 256, 256), 0.5, dtype=np.float32)
    photons, read = 400.0, 3.0
    noisy = add_poisson_gaussian_noise(image, photons_at_one=photons, read_noise_e=read, rng=rng)
    expected_var = (0.5 * photons + read**2) / photons**2
    assert noisy.var() == pytest.approx(expected_var, rel=0.05)
    assert noisy.mean() == pytest.approx(0.5, abs=0.005)


def test_jpeg_roundtrip_is_close_and_8_bit() -> None:
    yy, xx = np.mgrid[:64, :64] / 64.0
    image = np.stack([yy, xx, 0.5 * (yy + xx)]).astype(np.float32)
    decoded = jpeg_roundtrip(image, quality=90)
    assert decoded.shape == image.shape
    assert np.abs(decoded - image).mean() < 0.01
    assert np.allclose(decoded * 255, np.rint(decoded * 255), atol=1e-4)
