"""Defocus physics of a widefield microscope.

Two imaging models, chosen by :attr:`Optics.condenser_na`:

**Incoherent** (``condenser_na=None``, the default; right for fluorescence, where every
emitter is its own incoherent source). The point spread function (PSF) at defocus
``defocus_um`` is computed from the objective's pupil by scalar diffraction: a circular
pupil of radius ``NA / wavelength`` (cycles per micrometre), a defocus phase from the
angular spectrum, ``2 pi z sqrt((n / lambda)^2 - f^2)``, and an optional primary
spherical-aberration term (Zernike ``sqrt(5) (6 rho^4 - 6 rho^2 + 1)``, in waves) that
makes +z and -z differ as the Deep-R paper observes. The amplitude PSF is the inverse
Fourier transform of the pupil; the intensity PSF is its squared modulus, integrated over
each camera pixel and normalised to sum to one. Its defocus blur is the objective's
geometric disc, radius ``z tan(asin(NA / n))``.

**Partially coherent brightfield** (``condenser_na`` set; Köhler illumination of an
absorbing, stained specimen with a condenser NA below the objective's, coherence factor
``sigma = condenser_na / na``). The image of a weak absorber (amplitude transmission
``1 - a``, ``|a| << 1``) is linear in ``a``, with the weak-object absorption transfer
function of Hopkins' theory (Streibl 1985),
``H(f) = integral S(rho) [P*(rho) P(rho + f) + P(rho) P*(rho - f)] d rho``, for a uniform
disc source ``S`` of radius ``condenser_na / wavelength`` and the same defocused, aberrated
pupil ``P`` as above; :func:`psf` returns its real-space kernel, normalised to sum to one,
so that ``1 - 2a`` (the in-focus intensity) blurred by it is the defocused image. Beyond
the depth of field the blur is mostly the shadow of the illumination cone, radius about
``z tan(asin(condenser_na))``, with coherent fringes on top; at 20x/0.75, sigma 0.5 and
10 um its second-moment radius is 2.8 um against the incoherent PSF's 6.9 um. The kernel
has negative lobes (coherent ringing: total negative weight ~0.01 at sigma 0.9, 0.1-0.26
at sigma 0.5, above 1 for a nearly coherent sigma 0.1). Stained tissue is not a weak
object everywhere; the linear model is the standard approximation for simulation. At
``sigma = 1`` the kernel is the incoherent PSF.

Images are blurred by the chosen kernel per channel (one emission wavelength for
fluorescence, one wavelength per colour channel for brightfield), in linear intensity,
with uniform or spatially varying defocus (a tilt plane or any depth map),
Poisson-Gaussian noise and JPEG compression as options.

All images here are float arrays ``(c, y, x)`` in [0, 1] unless stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import fft as sp_fft

FloatArray = NDArray[np.floating]

#: Wavelengths (micrometres) used for the R, G and B channels of brightfield images.
BRIGHTFIELD_WAVELENGTHS_UM: tuple[float, float, float] = (0.61, 0.54, 0.46)

#: Condenser aperture as a fraction of the objective's in a typical Köhler set-up (the
#: usual advice: open the condenser to 2/3-3/4 of the objective NA); 0.5 at 20x/0.75.
TYPICAL_COHERENCE_SIGMA = 2.0 / 3.0


def typical_condenser_na(na: float) -> float:
    """Condenser NA of a typical Köhler brightfield set-up for an objective of ``na``.

    Parameters
    ----------
    na : float
        Objective numerical aperture.

    Returns
    -------
    float
        ``TYPICAL_COHERENCE_SIGMA * na``, rounded to 3 decimals.
    """
    return round(TYPICAL_COHERENCE_SIGMA * float(na), 3)


@dataclass(frozen=True, slots=True)
class Optics:
    """Imaging parameters of one channel of a widefield microscope."""

    na: float
    """Numerical aperture of the objective."""
    wavelength_um: float
    """Vacuum wavelength of the detected light, in micrometres."""
    mpp: float
    """Pixel size in the sample plane, in micrometres per pixel."""
    immersion_index: float = 1.0
    """Refractive index of the immersion medium (1.0 for a dry objective)."""
    spherical_waves: float = 0.0
    """Primary spherical aberration, in waves (Zernike Z(4,0) coefficient)."""
    condenser_na: float | None = None
    """Numerical aperture of the Köhler condenser (a uniform disc source); ``None`` for
    incoherent imaging (fluorescence). Set, :func:`psf` gives the partially coherent
    absorption kernel of brightfield imaging (see the module docstring)."""

    def __post_init__(self) -> None:
        if not 0 < self.na < self.immersion_index:
            raise ValueError(f"NA {self.na} must lie in (0, immersion index)")
        if self.wavelength_um <= 0 or self.mpp <= 0:
            raise ValueError("wavelength_um and mpp must be positive")
        if self.condenser_na is not None and not 0 < self.condenser_na <= self.na:
            raise ValueError(
                f"condenser NA {self.condenser_na} must lie in (0, objective NA {self.na}]"
            )

    @property
    def coherence(self) -> float | None:
        """Partial coherence factor ``sigma = condenser_na / na`` (``None``: incoherent)."""
        return None if self.condenser_na is None else self.condenser_na / self.na

    @property
    def cutoff_per_um(self) -> float:
        """Radius of the coherent pupil in spatial frequency (cycles per micrometre)."""
        return self.na / self.wavelength_um

    @property
    def depth_of_field_um(self) -> float:
        """Wave-optical depth of field ``n lambda / NA^2``."""
        return self.immersion_index * self.wavelength_um / self.na**2

    def blur_radius_um(self, defocus_um: float) -> float:
        """Geometric radius of the defocus blur disc at ``defocus_um``."""
        half_angle = math.asin(self.na / self.immersion_index)
        return abs(defocus_um) * math.tan(half_angle)


def brightfield_optics(
    na: float,
    mpp: float,
    *,
    immersion_index: float = 1.0,
    spherical_waves: float = 0.0,
    condenser_na: float | None = None,
) -> tuple[Optics, Optics, Optics]:
    """Optics of the R, G and B channels of a brightfield microscope.

    Parameters
    ----------
    na : float
        Numerical aperture of the objective.
    mpp : float
        Pixel size in micrometres per pixel.
    immersion_index : float, optional
        Refractive index of the immersion medium.
    spherical_waves : float, optional
        Primary spherical aberration in waves.
    condenser_na : float, optional
        NA of the Köhler condenser, at most ``na``: the channels then use the partially
        coherent absorption kernel. ``None`` (default): the incoherent PSF.

    Returns
    -------
    tuple of Optics
        One per channel, wavelengths :data:`BRIGHTFIELD_WAVELENGTHS_UM`.
    """
    return tuple(  # type: ignore[return-value]
        Optics(na, wl, mpp, immersion_index, spherical_waves, condenser_na)
        for wl in BRIGHTFIELD_WAVELENGTHS_UM
    )


def scanner_optics(na: float, mpp: float, *, spherical_waves: float = 0.0) -> tuple[Optics, ...]:
    """Brightfield R, G and B optics as a slide scanner images H&E: Köhler illumination with
    a typical condenser (:func:`typical_condenser_na`).

    Parameters
    ----------
    na : float
        Numerical aperture of the objective.
    mpp : float
        Pixel size in micrometres per pixel.
    spherical_waves : float, optional
        Primary spherical aberration in waves.

    Returns
    -------
    tuple of Optics
        :func:`brightfield_optics` with ``condenser_na=typical_condenser_na(na)``.
    """
    return brightfield_optics(
        na, mpp, spherical_waves=spherical_waves, condenser_na=typical_condenser_na(na)
    )


def _psf_size_px(optics: Optics, defocus_um: float) -> int:
    """An odd PSF support that holds the blur disc and the Airy rings around it."""
    radius_um = optics.blur_radius_um(defocus_um) + 4.0 * optics.wavelength_um / optics.na
    radius_um += 2.0 * abs(optics.spherical_waves) * optics.wavelength_um / optics.na
    return 2 * math.ceil(1.25 * radius_um / optics.mpp) + 1


#: Least number of frequency samples across the radius of the condenser's source disc.
_SOURCE_RADIUS_SAMPLES = 8


@lru_cache(maxsize=256)
def _psf_cached(optics: Optics, defocus_um: float, size_px: int) -> FloatArray:
    # Oversample so the grid resolves the incoherent cutoff 2 NA / lambda, then bin to
    # camera pixels (integration over the pixel area).
    nyquist_mpp = optics.wavelength_um / (4.0 * optics.na)
    oversample = max(1, math.ceil(optics.mpp / nyquist_mpp))
    oversample += 1 - oversample % 2  # odd, so the optical axis is a bin's centre
    fine_mpp = optics.mpp / oversample
    fine_size = size_px * oversample
    # Pupil grid: large enough that the defocus phase is sampled (the spatial extent
    # fine_size * fine_mpp holds the blur) and padded 2x against wrap-around.
    n_fft = 2 * fine_size
    if optics.condenser_na is not None:
        # ... and fine enough that the source disc is a disc, not a handful of points.
        source_per_um = optics.condenser_na / optics.wavelength_um
        n_fft = max(n_fft, math.ceil(_SOURCE_RADIUS_SAMPLES / (source_per_um * fine_mpp)))
    n_fft = sp_fft.next_fast_len(n_fft)
    freq = sp_fft.fftfreq(n_fft, d=fine_mpp)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    f2 = fx**2 + fy**2
    rho2 = f2 / optics.cutoff_per_um**2
    inside = rho2 <= 1.0
    kz = np.sqrt(np.maximum((optics.immersion_index / optics.wavelength_um) ** 2 - f2, 0.0))
    phase = 2.0 * np.pi * defocus_um * kz
    if optics.spherical_waves:
        zernike = math.sqrt(5.0) * (6.0 * rho2**2 - 6.0 * rho2 + 1.0)
        phase = phase + 2.0 * np.pi * optics.spherical_waves * zernike
    pupil = np.where(inside, np.exp(1j * phase), 0.0)
    amplitude = sp_fft.ifft2(pupil)
    if optics.condenser_na is None:
        kernel = np.abs(amplitude) ** 2
    else:
        # Weak-object absorption transfer function of Köhler illumination,
        #   H(f) = sum_rho S(rho) [P*(rho) P(rho + f) + P(rho) P*(rho - f)],
        # a sum of two cross-correlations of S P with P on the frequency grid. By the
        # correlation theorem its inverse transform is the product of the inverse
        # transforms, 2 Re[conj(IFFT(S P)) IFFT(P)]: the amplitude PSF of the pupil
        # restricted to the source disc times that of the whole pupil. The grid spans
        # 1 / fine_mpp >= 4 NA / lambda, twice H's support, so the circular correlation
        # does not wrap around.
        # The disc's rim is anti-aliased (weights by the distance to the rim in grid
        # steps), so its area and the kernel converge smoothly with the grid.
        rim_steps = (source_per_um - np.sqrt(f2)) * (n_fft * fine_mpp)
        source = np.clip(rim_steps + 0.5, 0.0, 1.0)
        source_amplitude = sp_fft.ifft2(source * pupil)
        kernel = 2.0 * np.real(np.conj(source_amplitude) * amplitude)
    kernel = sp_fft.fftshift(kernel)
    centre = n_fft // 2
    half = fine_size // 2
    # Centre the crop so that the fine pixel of the optical axis sits in the middle of
    # the central camera pixel after binning.
    start = centre - half
    crop = kernel[start : start + fine_size, start : start + fine_size]
    binned = crop.reshape(size_px, oversample, size_px, oversample).sum(axis=(1, 3))
    binned /= binned.sum()
    binned.setflags(write=False)
    return binned


def psf(optics: Optics, defocus_um: float, *, size_px: int | None = None) -> FloatArray:
    """Defocus kernel of one channel, sampled on camera pixels.

    The incoherent PSF, or with ``optics.condenser_na`` set the kernel of the partially
    coherent weak-object absorption transfer function (see the module docstring).

    Parameters
    ----------
    optics : Optics
        The channel's imaging parameters.
    defocus_um : float
        Distance of the sample from the focal plane in micrometres (sign matters only
        with spherical aberration).
    size_px : int, optional
        Odd edge length of the returned kernel; by default large enough for the blur.

    Returns
    -------
    ndarray of shape (size_px, size_px)
        Sums to 1, centred on the middle pixel, read-only (cached). Non-negative for
        the incoherent PSF; the partially coherent kernel has negative lobes.

    Examples
    --------
    >>> k = psf(Optics(na=0.75, wavelength_um=0.55, mpp=0.25), 2.0)
    >>> round(float(k.sum()), 6)
    1.0
    """
    size = _psf_size_px(optics, defocus_um) if size_px is None else int(size_px)
    if size % 2 == 0:
        size += 1
    return _psf_cached(optics, round(float(defocus_um), 4), size)


def _blur_uniform(channel: FloatArray, kernel: FloatArray) -> FloatArray:
    # Imported here: scipy.signal pulls in scipy.stats (~0.5 s), which `run --qc` and
    # `--only-blurred` (physics via the defocus estimate) would pay at start-up.
    from scipy.signal import fftconvolve

    pad = kernel.shape[0] // 2
    padded = np.pad(channel, pad, mode="reflect" if min(channel.shape) > pad else "edge")
    return np.asarray(fftconvolve(padded, kernel, mode="valid"), dtype=np.float32)


def defocus_image(
    image: FloatArray,
    defocus_um: float | FloatArray,
    *,
    optics: Sequence[Optics],
    z_step_um: float | None = None,
) -> FloatArray:
    """Blur an in-focus image as the microscope would at the given defocus.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        In-focus intensities (float).
    defocus_um : float or ndarray of shape (Y, X)
        Uniform defocus, or a defocus map (e.g. :func:`tilt_defocus_map`) in micrometres.
    optics : sequence of Optics
        One per channel (see :func:`brightfield_optics`).
    z_step_um : float, optional
        For a defocus map: spacing of the precomputed planes that are interpolated
        linearly per pixel. Default: a quarter of the depth of field.

    Returns
    -------
    ndarray of shape (C, Y, X), float32
        The defocused image (no noise).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or len(optics) != image.shape[0]:
        raise ValueError("image must be (c, y, x) with one Optics per channel")
    out = np.empty_like(image)
    if np.ndim(defocus_um) == 0:
        z = float(defocus_um)  # type: ignore[arg-type]
        for c, opt in enumerate(optics):
            out[c] = _blur_uniform(image[c], psf(opt, z))
        return out
    depth = np.asarray(defocus_um, dtype=np.float64)
    if depth.shape != image.shape[1:]:
        raise ValueError("defocus map must have the image's (y, x) shape")
    for c, opt in enumerate(optics):
        step = z_step_um or max(opt.depth_of_field_um / 4.0, 0.05)
        z_lo, z_hi = float(depth.min()), float(depth.max())
        n_planes = max(2, math.ceil((z_hi - z_lo) / step) + 1)
        planes_z = np.linspace(z_lo, z_hi, n_planes)
        position = (depth - z_lo) / max(planes_z[1] - planes_z[0], 1e-12)
        index = np.clip(np.floor(position).astype(int), 0, n_planes - 2)
        frac = (position - index).astype(np.float32)
        acc = np.zeros(image.shape[1:], dtype=np.float32)
        for k, zk in enumerate(planes_z):
            weight = np.where(index == k, 1.0 - frac, 0.0) + np.where(index == k - 1, frac, 0.0)
            if not weight.any():
                continue
            acc += weight.astype(np.float32) * _blur_uniform(image[c], psf(opt, float(zk)))
        out[c] = acc
    return out


def tilt_defocus_map(
    shape_yx: tuple[int, int],
    *,
    mpp: float,
    tilt_deg: float,
    center_defocus_um: float = 0.0,
    axis: str = "y",
) -> FloatArray:
    """Defocus of a sample plane tilted about the field's centre.

    Parameters
    ----------
    shape_yx : tuple of int
        Height and width of the field in pixels.
    mpp : float
        Pixel size in micrometres per pixel.
    tilt_deg : float
        Tilt angle of the sample plane in degrees.
    center_defocus_um : float, optional
        Defocus at the centre of the field.
    axis : {"y", "x"}
        The defocus changes along this axis (rows or columns).

    Returns
    -------
    ndarray of shape (Y, X), float64
        Defocus in micrometres at every pixel.
    """
    h, w = shape_yx
    slope = math.tan(math.radians(tilt_deg))
    if axis == "y":
        along = (np.arange(h) - (h - 1) / 2.0) * mpp
        ramp = np.broadcast_to(along[:, None], (h, w))
    elif axis == "x":
        along = (np.arange(w) - (w - 1) / 2.0) * mpp
        ramp = np.broadcast_to(along[None, :], (h, w))
    else:
        raise ValueError("axis must be 'y' or 'x'")
    return np.asarray(center_defocus_um + slope * ramp, dtype=np.float64)


def add_poisson_gaussian_noise(
    image: FloatArray,
    *,
    photons_at_one: float,
    read_noise_e: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Shot noise and camera read noise.

    Parameters
    ----------
    image : ndarray
        Intensities in [0, 1]; 1 maps to ``photons_at_one`` detected photo-electrons.
    photons_at_one : float
        Photo-electrons at intensity 1 (exposure and quantum efficiency together).
    read_noise_e : float
        Standard deviation of the Gaussian read noise in electrons.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    ndarray, float32
        Noisy intensities on the same scale (not clipped).
    """
    electrons = rng.poisson(np.clip(image, 0, None) * photons_at_one).astype(np.float32)
    electrons += rng.normal(0.0, read_noise_e, size=image.shape).astype(np.float32)
    return electrons / np.float32(photons_at_one)


def jpeg_roundtrip(image: FloatArray, *, quality: int) -> FloatArray:
    """Compress and decompress with JPEG, as scanners store whole-slide images.

    Parameters
    ----------
    image : ndarray of shape (C, Y, X)
        Intensities in [0, 1]; C is 1 (grey) or 3 (RGB).
    quality : int
        JPEG quality 1-100.

    Returns
    -------
    ndarray of shape (C, Y, X), float32
        The decoded image in [0, 1], quantised to 8 bits.
    """
    import imagecodecs

    u8 = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
    pixels = np.ascontiguousarray(u8[0] if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1))
    decoded = imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(pixels, level=quality))
    decoded = decoded[None] if decoded.ndim == 2 else np.moveaxis(decoded, -1, 0)
    return decoded.astype(np.float32) / np.float32(255.0)


def with_mpp(optics: Sequence[Optics], mpp: float) -> tuple[Optics, ...]:
    """The same optics sampled at another pixel size."""
    return tuple(replace(o, mpp=mpp) for o in optics)
