"""Bead detection, isolation, cluster exclusion and FWHM vs z on synthetic and real stacks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from wsi_deepr import beads

SHARED_BEADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "beads"
FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


def _sigma(z: np.ndarray) -> np.ndarray:
    """Known lateral spread of the synthetic beads at each plane (pixels)."""
    return 1.5 + 0.8 * np.abs(z)


def _stack() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """(9, 120, 160): five isolated beads, a close pair (one crop), one at the border."""
    z = np.arange(9) - 4.0
    yy, xx = np.mgrid[:120, :160].astype(float)
    isolated = [(25.3, 30.6), (30.0, 90.2), (70.7, 40.1), (80.4, 120.5), (95.2, 75.0)]
    pair = [(60.0, 78.0), (60.0, 90.0)]
    border = [(3.0, 150.0)]
    stack = np.full((9, 120, 160), 0.02)
    for k, s in enumerate(_sigma(z)):
        for cy, cx in isolated + pair + border:
            peak = (1.5 / s) ** 2  # energy conserved as the spot spreads
            stack[k] += peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    return stack, isolated


def test_focused_plane_is_the_sharpest() -> None:
    stack, _ = _stack()
    assert beads.focused_plane(stack) == 4


def test_detection_marks_border_and_neighbours_as_not_isolated() -> None:
    stack, isolated = _stack()
    found = beads.detect_beads(stack[4], crop_px=30)
    assert len(found) == 8
    good = [b for b in found if b.isolated]
    assert len(good) == len(isolated)
    for cy, cx in isolated:
        assert any(abs(b.center_yx[0] - cy) < 0.3 and abs(b.center_yx[1] - cx) < 0.3 for b in good)


def test_fwhm_vs_z_recovered_and_cluster_excluded() -> None:
    stack, isolated = _stack()
    # A merged pair reads as one wide "bead": put a lone wide blob in to be excluded.
    yy, xx = np.mgrid[:120, :160].astype(float)
    blob = np.exp(-((yy - 100.0) ** 2 + (xx - 20.0) ** 2) / (2 * 4.0**2))
    stack = stack + blob[None] * np.array([0.3] * 9)[:, None, None]
    analysis = beads.analyse_beads({"input": stack, "output": stack}, z_step_um=0.5, crop_px=30)
    assert analysis.focus_index == 4
    np.testing.assert_allclose(analysis.z_um, (np.arange(9) - 4) * 0.5)
    kept = [b.center_yx for b, k in zip(analysis.beads, analysis.kept, strict=True) if k]
    assert len(kept) == len(isolated)
    assert all(abs(cy - 100) > 5 or abs(cx - 20) > 5 for cy, cx in kept)
    mean, std = analysis.mean_std("input")
    expected = FWHM_PER_SIGMA * _sigma(np.arange(9) - 4.0)
    np.testing.assert_allclose(mean, expected, rtol=0.02)
    assert np.all(std < 0.02 * expected)
    np.testing.assert_allclose(analysis.mean_std("output")[0], mean)


def test_exclude_outliers_keeps_the_typical_beads() -> None:
    values = np.array([4.0, 4.1, 3.9, 4.05, 9.0, np.nan, 4.0])
    np.testing.assert_array_equal(
        beads.exclude_outliers(values), [True, True, True, True, False, False, True]
    )


def test_lateral_fwhm_is_nan_where_the_bead_is_gone() -> None:
    stack = np.zeros((3, 40, 40))
    yy, xx = np.mgrid[:40, :40]
    stack[1] = np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / (2 * 2.0**2))
    bead = beads.Bead((20.0, 20.0), (5, 5), True)
    fwhm = beads.lateral_fwhm_px(stack + 1e-3, bead, crop_px=30)
    assert np.isnan(fwhm[0]) and np.isnan(fwhm[2])
    assert fwhm[1] == pytest.approx(FWHM_PER_SIGMA * 2.0, rel=0.02)


def test_real_bead_stack() -> None:
    path = SHARED_BEADS / "bian_bead_image1_crop.tif"
    if not path.is_file():
        pytest.skip(f"real bead stacks not available ({path} is absent)")
    import tifffile

    stack = tifffile.imread(path).astype(float)[10:38]  # +/- 1.75 um around the focus
    analysis = beads.analyse_beads({"input": stack}, z_step_um=0.125, crop_px=40)
    assert len(analysis.beads) == 4 and analysis.kept.all()
    mean, _ = analysis.mean_std("input")
    at_focus = mean[analysis.focus_index]
    # 300 nm-class beads at 0.022 um/px: a few hundred nm FWHM, and wider 1 um away.
    assert 5 < at_focus < 20
    assert np.nanmin(mean) == pytest.approx(at_focus, rel=0.1)
    assert np.isnan(mean[0]) or mean[0] > at_focus
