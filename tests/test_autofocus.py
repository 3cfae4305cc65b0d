"""Brent autofocus on synthetic stacks made with the physics module; timing arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_deepr import autofocus, metrics, physics
from wsi_deepr.errors import OptionError

OPTICS = (physics.Optics(na=0.75, wavelength_um=0.55, mpp=0.5),)


def _sample(seed: int = 0) -> np.ndarray:
    """Sparse bright spots on a dim background: fluorescence-like, (1, 64, 64)."""
    rng = np.random.default_rng(seed)
    spots = (rng.random((64, 64)) > 0.97).astype(float)
    return (0.05 + 0.9 * ndi.gaussian_filter(spots, 0.7) / 0.3)[None].clip(0, 1)


@pytest.mark.parametrize("criterion", list(metrics.FOCUS_CRITERIA))
def test_brent_finds_the_known_focus_within_tolerance(criterion: str) -> None:
    scope = autofocus.SimulatedStack(_sample(), OPTICS, focus_um=1.3, photons_at_one=None)
    result = autofocus.brent_autofocus(
        scope, metrics.FOCUS_CRITERIA[criterion], start_um=-0.8, name=criterion
    )
    assert abs(result.found_um - 1.3) <= autofocus.TOLERANCE_UM
    assert result.images == scope.captures
    assert 5 <= result.images <= 40
    assert result.criterion == criterion


def test_brent_with_noise_lands_within_the_depth_of_field() -> None:
    scope = autofocus.SimulatedStack(_sample(1), OPTICS, focus_um=-2.0, photons_at_one=500.0)
    result = autofocus.brent_autofocus(scope, metrics.focus_vol5, start_um=0.5)
    dof = OPTICS[0].depth_of_field_um
    assert autofocus.focus_found(result.found_um, -2.0, depth_of_field_um=dof)


def test_a_repeated_capture_is_the_same_image() -> None:
    scope = autofocus.SimulatedStack(_sample(), OPTICS, photons_at_one=200.0, seed=3)
    np.testing.assert_array_equal(scope.capture(0.7), scope.capture(0.7))
    assert not np.array_equal(scope.capture(0.7), scope.capture(-0.7))
    assert scope.captures == 4


def test_zstack_interpolates_between_planes() -> None:
    planes = np.stack([np.full((4, 4), v) for v in (0.0, 1.0, 3.0)])
    stack = autofocus.ZStack(planes, z_step_um=0.5, z0_um=-0.5)
    np.testing.assert_allclose(stack.capture(0.0), 1.0)
    np.testing.assert_allclose(stack.capture(0.25), 2.0)
    np.testing.assert_allclose(stack.capture(-3.0), 0.0)
    np.testing.assert_allclose(stack.capture(9.0), 3.0)
    np.testing.assert_allclose(stack.heights_um, [-0.5, 0.0, 0.5])


def test_brent_on_a_zstack_finds_the_sharpest_plane() -> None:
    sharp = _sample(2)[0]
    planes = np.stack([ndi.gaussian_filter(sharp, 0.2 + abs(k - 13) * 0.4) for k in range(30)])
    stack = autofocus.ZStack(planes, z_step_um=0.2)
    result = autofocus.brent_autofocus(stack, metrics.focus_std, start_um=3.0)
    assert abs(result.found_um - 13 * 0.2) <= 0.2


def test_scan_timing() -> None:
    timing = autofocus.ScanTiming(exposure_s=0.1, stage_move_s=0.05, fov_px=(2048, 2048), mpp=0.325)
    assert timing.fov_mm2 == pytest.approx((2048 * 0.325e-3) ** 2)
    assert timing.autofocus_s(10, 0.5) == pytest.approx(10 * 0.15 + 0.5)
    assert timing.s_per_mm2(2.0) == pytest.approx(2.0 / timing.fov_mm2)


def test_bad_search_settings_are_refused() -> None:
    scope = autofocus.SimulatedStack(_sample(), OPTICS)
    with pytest.raises(OptionError):
        autofocus.brent_autofocus(scope, metrics.focus_std, start_um=0.0, tolerance_um=0.0)
