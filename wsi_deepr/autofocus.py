"""Simulated online autofocus (the paper's Table 1 baseline).

A microscope's software autofocus (Micro-Manager's OughtaFocus) moves the stage, captures
an image, scores it with a focus criterion and lets Brent's method pick the next height,
until the bracket is narrower than the tolerance. Here the microscope is simulated: a
:class:`SimulatedStack` renders any height from an in-focus image with the physics module,
a :class:`ZStack` interpolates a real acquired stack. :func:`brent_autofocus` runs the
search with ``scipy.optimize.minimize_scalar(method="bounded")`` (Brent's method on an
interval) and counts the images captured; :class:`ScanTiming` turns that count into
seconds per square millimetre with a stated exposure, stage-move time and field of view.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar

from wsi_deepr import physics
from wsi_deepr.errors import OptionError

FloatArray = NDArray[np.floating]

SEARCH_RANGE_UM = 10.0
"""Full width of the search interval around the starting height (paper: 10 um)."""
TOLERANCE_UM = 0.1
"""Brent's absolute tolerance on the height (paper: 0.1 um)."""
EXPOSURE_S = 0.1
"""Camera exposure per captured image (paper: about 100 ms)."""


class Microscope(Protocol):
    """Something that captures a ``(y, x)`` image at a stage height."""

    def capture(self, z_um: float) -> NDArray[np.float64]:
        """The image at stage height ``z_um`` (micrometres)."""
        ...


@dataclass
class SimulatedStack:
    """A field of view whose sample sits at ``focus_um``, imaged by the physics module.

    Captured images are the in-focus image defocused by ``z_um - focus_um`` (channels
    averaged), with Poisson-Gaussian noise seeded by the height so a repeated capture at
    the same height gives the same image.
    """

    in_focus: FloatArray
    """In-focus linear intensities ``(C, Y, X)`` in [0, 1]."""
    optics: Sequence[physics.Optics]
    """One per channel."""
    focus_um: float = 0.0
    """Stage height at which the sample is in focus."""
    photons_at_one: float | None = 1000.0
    """Photo-electrons at intensity 1; ``None`` for no noise."""
    seed: int = 0
    """Seed of the noise."""
    captures: int = field(default=0, init=False)
    """Images captured so far."""

    def capture(self, z_um: float) -> NDArray[np.float64]:
        """The image at stage height ``z_um``, ``(Y, X)``."""
        self.captures += 1
        image = physics.defocus_image(self.in_focus, z_um - self.focus_um, optics=self.optics)
        if self.photons_at_one is not None:
            rng = np.random.default_rng([self.seed, round(abs(z_um) * 1e4), z_um < 0])
            image = physics.add_poisson_gaussian_noise(
                image, photons_at_one=self.photons_at_one, read_noise_e=2.0, rng=rng
            )
        return np.asarray(image, dtype=np.float64).mean(axis=0)


@dataclass
class ZStack:
    """A real acquired stack: planes ``(Z, Y, X)`` at heights ``z0_um + k z_step_um``.

    A capture between two planes is their linear interpolation; heights outside the stack
    give the nearest end plane.
    """

    planes: FloatArray
    """The stack ``(Z, Y, X)``."""
    z_step_um: float
    """Axial spacing of the planes."""
    z0_um: float = 0.0
    """Height of the first plane."""
    captures: int = field(default=0, init=False)
    """Images captured so far."""

    @property
    def heights_um(self) -> NDArray[np.float64]:
        """Height of each plane."""
        return self.z0_um + self.z_step_um * np.arange(len(self.planes), dtype=np.float64)

    def capture(self, z_um: float) -> NDArray[np.float64]:
        """The (interpolated) plane at ``z_um``, ``(Y, X)``."""
        self.captures += 1
        position = float(np.clip((z_um - self.z0_um) / self.z_step_um, 0, len(self.planes) - 1))
        k = min(math.floor(position), len(self.planes) - 2)
        frac = position - k
        lo = np.asarray(self.planes[k], dtype=np.float64)
        hi = np.asarray(self.planes[k + 1], dtype=np.float64)
        return np.asarray((1 - frac) * lo + frac * hi)


@dataclass(frozen=True, slots=True)
class AutofocusResult:
    """Outcome of one focus search."""

    criterion: str
    """Focus criterion name."""
    start_um: float
    """Starting stage height (centre of the search interval)."""
    found_um: float
    """Height the search settled on."""
    images: int
    """Images captured (criterion evaluations)."""
    compute_s: float
    """Seconds spent evaluating the criterion (this machine)."""


def brent_autofocus(
    microscope: Microscope,
    criterion: Callable[[FloatArray], float],
    *,
    start_um: float,
    search_range_um: float = SEARCH_RANGE_UM,
    tolerance_um: float = TOLERANCE_UM,
    name: str = "",
) -> AutofocusResult:
    """Search the height that maximises a focus criterion with Brent's method.

    Parameters
    ----------
    microscope : Microscope
        Captures images at heights.
    criterion : callable
        ``(Y, X) image -> float``, larger when sharper (e.g. :func:`metrics.focus_vol5`).
    start_um : float
        Current stage height; the search covers ``start +/- search_range_um / 2``.
    search_range_um : float
        Width of the search interval.
    tolerance_um : float
        Absolute tolerance on the height (Brent's ``xatol``).
    name : str
        Criterion name for the result.

    Returns
    -------
    AutofocusResult
    """
    if search_range_um <= 0 or tolerance_um <= 0:
        raise OptionError("autofocus", "search range and tolerance must be positive")
    images = 0
    compute_s = 0.0

    def cost(z_um: float) -> float:
        nonlocal images, compute_s
        image = microscope.capture(float(z_um))
        images += 1
        t0 = time.perf_counter()
        value = criterion(image)
        compute_s += time.perf_counter() - t0
        return -value

    half = search_range_um / 2.0
    result = minimize_scalar(
        cost,
        bounds=(start_um - half, start_um + half),
        method="bounded",
        options={"xatol": tolerance_um},
    )
    return AutofocusResult(name, float(start_um), float(result.x), images, compute_s)


@dataclass(frozen=True, slots=True)
class ScanTiming:
    """Stated acquisition timings that turn captured images into seconds per mm^2."""

    exposure_s: float = EXPOSURE_S
    """Exposure of one image."""
    stage_move_s: float = 0.05
    """Axial stage move and settle per step (a stated assumption, not measured)."""
    fov_px: tuple[int, int] = (2048, 2048)
    """Camera field of view in pixels (sCMOS ORCA-Flash4.0, as in the paper)."""
    mpp: float = 0.325
    """Pixel size in the sample (6.5 um camera pixels behind a 20x objective)."""

    @property
    def fov_mm2(self) -> float:
        """Area of one field of view in square millimetres."""
        return self.fov_px[0] * self.fov_px[1] * (self.mpp * 1e-3) ** 2

    def autofocus_s(self, images: int, compute_s: float = 0.0) -> float:
        """Seconds one focus search takes (the final in-focus capture excluded, as the paper)."""
        return images * (self.exposure_s + self.stage_move_s) + compute_s

    def s_per_mm2(self, seconds_per_fov: float) -> float:
        """Convert seconds per field of view to seconds per mm^2."""
        return seconds_per_fov / self.fov_mm2


def focus_found(found_um: float, true_um: float, *, depth_of_field_um: float) -> bool:
    """Whether a search landed within half the depth of field of the true focus."""
    return abs(found_um - true_um) <= max(depth_of_field_um / 2.0, TOLERANCE_UM)
