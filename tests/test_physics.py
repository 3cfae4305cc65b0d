"""Defocus physics against independent references.

Airy pattern and Gibson-Lanni PSF (incoherent), brute-force Abbe summation over the
condenser (partially coherent brightfield).
"""

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


# --- Köhler (partially coherent) brightfield --------------------------------------------


def _second_moment_radius_um(kernel: np.ndarray, mpp: float) -> float:
    n = kernel.shape[0]
    yy, xx = (np.mgrid[:n, :n] - n // 2) * mpp
    return float(np.sqrt((kernel * (yy**2 + xx**2)).sum() / kernel.sum()))


def _reference_pupil(
    n_px: int, mpp: float, na: float, wavelength_um: float, defocus_um: float, sph: float
) -> tuple[np.ndarray, np.ndarray]:
    """Defocused circular pupil on the grid of an n_px periodic field, and |f|^2."""
    f = np.fft.fftfreq(n_px, d=mpp)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    f2 = fx**2 + fy**2
    rho2 = f2 / (na / wavelength_um) ** 2
    kz = np.sqrt(np.maximum(wavelength_um**-2 - f2, 0.0))
    phase = 2 * np.pi * defocus_um * kz
    phase = phase + 2 * np.pi * sph * np.sqrt(5.0) * (6 * rho2**2 - 6 * rho2 + 1)
    return np.where(rho2 <= 1.0, np.exp(1j * phase), 0.0), f2


def _abbe_image(
    transmission: np.ndarray,
    mpp: float,
    *,
    na: float,
    condenser_na: float,
    wavelength_um: float,
    defocus_um: float,
    sph: float = 0.0,
) -> np.ndarray:
    """Partially coherent image by Abbe's method: one coherent image per source point.

    The field is periodic, so the source points are the grid frequencies inside the
    condenser disc; a tilted plane wave exp(i 2 pi s x) shifts the object's spectrum by s.
    Normalised by the number of source points (the clear-field intensity is 1).
    """
    n = transmission.shape[0]
    pupil, f2 = _reference_pupil(n, mpp, na, wavelength_um, defocus_um, sph)
    spectrum = np.fft.fft2(transmission)
    sources = np.argwhere(f2 <= (condenser_na / wavelength_um) ** 2)
    image = np.zeros((n, n))
    for ky, kx in sources:
        field = np.fft.ifft2(np.roll(spectrum, (ky, kx), axis=(0, 1)) * pupil)
        image += np.abs(field) ** 2
    return image / len(sources)


def _periodic_blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Circular convolution; a kernel larger than the field is folded onto it."""
    n, m = image.shape[0], kernel.shape[0]
    folded = np.zeros((n, n))
    index = (np.arange(m) - m // 2) % n
    np.add.at(folded, (index[:, None], index[None, :]), kernel)
    return np.real(np.fft.ifft2(np.fft.fft2(image) * np.fft.fft2(folded)))


@pytest.mark.parametrize(("defocus_um", "sph"), [(0.0, 0.0), (2.0, 0.0), (5.0, 0.0), (-3.0, 0.3)])
def test_kohler_kernel_matches_abbe_summation_for_a_weak_absorber(
    defocus_um: float, sph: float
) -> None:
    # 0.1 um pixels: finer than the kernel's Nyquist step lambda / (4 NA), so psf() does
    # not bin and both sides are point samples of the same band-limited image.
    mpp, n_px, na, wavelength_um = 0.1, 256, 0.75, 0.55
    rng = np.random.default_rng(3)
    absorption = rng.uniform(-0.02, 0.02, (n_px, n_px))
    abbe = _abbe_image(
        1.0 - absorption,
        mpp,
        na=na,
        condenser_na=0.5 * na,
        wavelength_um=wavelength_um,
        defocus_um=defocus_um,
        sph=sph,
    )
    optics = Optics(na, wavelength_um, mpp, spherical_waves=sph, condenser_na=0.5 * na)
    # |t|^2 = 1 - 2a to first order, blurred by the absorption kernel.
    predicted = _periodic_blur(1.0 - 2.0 * absorption, psf(optics, defocus_um))
    contrast_abbe = abbe - abbe.mean()
    contrast_kernel = predicted - predicted.mean()
    assert np.corrcoef(contrast_abbe.ravel(), contrast_kernel.ravel())[0, 1] >= 0.99
    relative_rms = np.sqrt(((contrast_abbe - contrast_kernel) ** 2).mean() / contrast_abbe.var())
    assert relative_rms < 0.05


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("defocus_um", [0.0, 3.0, -7.0])
def test_kohler_kernel_sums_to_one_with_the_incoherent_support(
    sigma: float, defocus_um: float
) -> None:
    optics = Optics(0.75, 0.55, 0.25, condenser_na=0.75 * sigma)
    kernel = psf(optics, defocus_um)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-9)
    assert kernel.shape == psf(Optics(0.75, 0.55, 0.25), defocus_um).shape
    # Negative lobes (coherent ringing) grow as the illumination gets more coherent:
    # their total weight is ~0.01 at sigma 0.9, 0.1-0.26 at 0.5 and above 1 at 0.1.
    negative_weight = -kernel.clip(max=0.0).sum()
    assert negative_weight < {0.1: 2.5, 0.5: 0.3, 0.9: 0.03}[sigma]


def test_condenser_na_is_validated_and_passed_through() -> None:
    with pytest.raises(ValueError, match="condenser NA"):
        Optics(0.75, 0.55, 0.25, condenser_na=0.8)
    with pytest.raises(ValueError, match="condenser NA"):
        Optics(0.75, 0.55, 0.25, condenser_na=0.0)
    channels = brightfield_optics(0.75, 0.25, condenser_na=0.5)
    assert [o.condenser_na for o in channels] == [0.5, 0.5, 0.5]
    assert channels[0].coherence == pytest.approx(0.5 / 0.75)
    assert brightfield_optics(0.75, 0.25)[0].condenser_na is None


def test_full_condenser_gives_the_incoherent_psf() -> None:
    """sigma = 1: the absorption transfer function is the incoherent OTF (Hopkins)."""
    for z in (0.0, 2.0, 5.0):
        incoherent = psf(Optics(0.75, 0.55, 0.25), z)
        full = psf(Optics(0.75, 0.55, 0.25, condenser_na=0.75), z)
        assert np.abs(full - incoherent).sum() < 0.02


def test_smaller_condenser_blurs_less() -> None:
    # The variance of blurred white noise is sum(kernel^2) = integral of |H|^2.
    for z in (2.0, 5.0, 10.0):
        narrow = psf(Optics(0.75, 0.55, 0.25, condenser_na=0.075), z)
        wide = psf(Optics(0.75, 0.55, 0.25, condenser_na=0.675), z)
        incoherent = psf(Optics(0.75, 0.55, 0.25), z)
        assert (narrow**2).sum() > 5.0 * (wide**2).sum()
        assert (wide**2).sum() > (incoherent**2).sum()


def test_kohler_blur_grows_with_defocus_and_is_symmetric_without_aberration() -> None:
    rng = np.random.default_rng(4)
    texture = rng.random((3, 128, 128)).astype(np.float32)
    optics = brightfield_optics(0.75, 0.25, condenser_na=0.375)
    variance = []
    for z in range(2, 11):
        plus = defocus_image(texture, float(z), optics=optics)[:, 20:-20, 20:-20]
        minus = defocus_image(texture, -float(z), optics=optics)[:, 20:-20, 20:-20]
        assert np.abs(plus - minus).max() < 1e-5
        variance.append(float(plus.var()))
    assert all(b < a for a, b in itertools.pairwise(variance))


def test_kohler_spherical_aberration_breaks_the_plus_minus_symmetry() -> None:
    plain = Optics(0.75, 0.55, 0.25, condenser_na=0.375)
    aberrated = Optics(0.75, 0.55, 0.25, spherical_waves=0.5, condenser_na=0.375)
    for z in (1.0, 3.0):
        same = np.abs(psf(plain, z, size_px=101) - psf(plain, -z, size_px=101)).max()
        differ = np.abs(psf(aberrated, z, size_px=101) - psf(aberrated, -z, size_px=101)).max()
        assert same < 1e-12
        assert differ > 1e-3


def test_kohler_blur_at_10_um_is_much_narrower_than_incoherent() -> None:
    """20x/0.75, sigma 0.5, z = 10 um: the shadow of the illumination cone, radius about
    z tan(asin(NA_c)) = 4.0 um (second moment ~2.85 um), not the objective's 11.3 um disc
    (second moment ~6.85 um)."""
    mpp = 0.25
    kohler = _second_moment_radius_um(psf(Optics(0.75, 0.55, mpp, condenser_na=0.375), 10), mpp)
    incoherent = _second_moment_radius_um(psf(Optics(0.75, 0.55, mpp), 10.0), mpp)
    assert incoherent == pytest.approx(6.85, rel=0.05)
    assert kohler == pytest.approx(2.85, rel=0.1)
    assert kohler / incoherent < 0.5


# --- plumbing: pairs and evaluation settings ------------------------------------------


def test_simulation_settings_draw_and_record_the_condenser_na() -> None:
    from wsi_deepr.pairs import SimulationSettings, simulate_pair

    settings = SimulationSettings.from_dict(
        "brightfield",
        {
            "defocus_range_um": [-10.0, 10.0],
            "na": 0.75,
            "mpp_range": [0.25, 0.5],
            "condenser_na_range": [0.3, 0.9],
        },
    )
    assert settings.condenser_na_range == (0.3, 0.9)
    region = np.random.default_rng(5).random((3, 96, 96)).astype(np.float32)
    drawn = []
    for seed in range(12):
        x, y, meta = simulate_pair(region, settings, np.random.default_rng(seed), crop_px=48)
        assert x.shape == y.shape == (3, 48, 48)
        assert 0.3 <= meta["condenser_na"] <= meta["na"]  # capped at the drawn NA
        drawn.append(meta["condenser_na"])
    assert len(set(drawn)) > 1
    # off by default: the incoherent PSF, and no condenser_na in the meta
    plain = SimulationSettings("brightfield", (-10.0, 10.0), 0.75, (0.25, 0.5))
    assert plain.condenser_na_range is None
    assert (
        "condenser_na" not in simulate_pair(region, plain, np.random.default_rng(0), crop_px=48)[2]
    )


@pytest.mark.parametrize(
    ("modality", "value"), [("fluorescence", [0.3, 0.6]), ("brightfield", [0.6, 0.3])]
)
def test_simulation_settings_reject_a_bad_condenser_range(modality: str, value: list) -> None:
    from wsi_deepr.pairs import SimulationSettings

    values = {"defocus_range_um": [-5.0, 5.0], "na": 0.75, "mpp_range": [0.25, 0.5]}
    with pytest.raises(TypeError, match="condenser_na_range"):
        SimulationSettings.from_dict(modality, values | {"condenser_na_range": value})


def test_eval_settings_pass_the_condenser_na_to_brightfield_optics() -> None:
    from wsi_deepr.evaluation import EvalSettings

    assert EvalSettings("brightfield", 0.75, 0.3, (0.0,)).optics()[0].condenser_na is None
    optics = EvalSettings("brightfield", 0.75, 0.3, (0.0,), condenser_na=0.45).optics()
    assert [o.condenser_na for o in optics] == [0.45, 0.45, 0.45]
