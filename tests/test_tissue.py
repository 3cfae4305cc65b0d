"""Tissue mask and slide-level statistics, on slides whose tissue is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slides import make_ome_tiff, make_png, make_tiff_slide, synthetic_tissue

from wsi_deepr.readers import open_slide
from wsi_deepr.tissue import (
    intensity_stats,
    mask_to_level0,
    region_has_tissue,
    tissue_fraction,
    tissue_mask,
)

BACKGROUND_RGB = (242, 242, 245)
STAIN_RGB = (200, 120, 170)


def _rectangle_slide(shape_yx: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """White RGB slide with one stained rectangle (rows y0:y1, columns x0:x1), with noise."""
    rng = np.random.default_rng(0)
    image = np.empty((3, *shape_yx), np.int16)
    y0, y1, x0, x1 = box
    for c in range(3):
        image[c] = BACKGROUND_RGB[c]
        image[c, y0:y1, x0:x1] = STAIN_RGB[c]
    image += rng.integers(-5, 6, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_brightfield_mask_finds_the_stained_rectangle(tmp_path: Path) -> None:
    box = (800, 2000, 400, 1500)
    image = _rectangle_slide((3000, 2200), box)
    slide = open_slide(make_tiff_slide(tmp_path / "rect.tif", image, 0.5, tile=256))
    mask = tissue_mask(slide)
    assert mask.dtype == bool
    assert mask.shape == slide.thumbnail.shape[1:]
    ds = slide.thumbnail_downsample
    truth = np.zeros_like(mask)
    truth[round(box[0] / ds) : round(box[1] / ds), round(box[2] / ds) : round(box[3] / ds)] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert tissue_fraction(mask) == pytest.approx(truth.mean(), rel=0.05)
    # level-0 questions: inside, outside, and a rectangle that only grazes the edge
    assert region_has_tissue(mask, slide, 1000, 1100, 600, 700)
    assert not region_has_tissue(mask, slide, 0, 512, 0, 512)
    assert region_has_tissue(mask, slide, 1990, 2400, 1490, 1900)
    blocks = mask_to_level0(mask, slide, block_px=512)
    assert blocks.shape == (6, 5)
    assert blocks[3, 2] and not blocks[0, 0] and not blocks[5, 4]


def test_blank_slides_give_empty_masks_and_safe_stats(tmp_path: Path) -> None:
    white = np.full((3, 700, 900), 243, np.uint8)
    slide = open_slide(make_tiff_slide(tmp_path / "white.tif", white, 0.5))
    mask = tissue_mask(slide)
    assert not mask.any()
    mean, std = intensity_stats(slide, mask)
    np.testing.assert_array_equal(mean, [243.0, 243.0, 243.0])
    assert mean.dtype == np.float64 and std.shape == (3,)
    assert (std > 0).all()  # dividing by it is safe

    dark = np.zeros((2, 700, 900), np.uint16)
    slide = open_slide(make_tiff_slide(tmp_path / "dark.tif", dark, 0.5))
    assert slide.modality == "fluorescence"
    assert not tissue_mask(slide).any()
    _, std = intensity_stats(slide, None)
    assert (std > 0).all()


def test_field_of_view_full_of_tissue_is_all_tissue(tmp_path: Path) -> None:
    image = _rectangle_slide((600, 800), (0, 600, 0, 800))
    slide = open_slide(make_png(tmp_path / "full.png", image), mpp=0.5)
    assert tissue_fraction(tissue_mask(slide)) > 0.98


def test_fluorescence_mask_covers_the_signal(tmp_path: Path) -> None:
    image = synthetic_tissue((1200, 1000), seed=3, rgb=False, n_channels=2, dtype=np.uint16)
    slide = open_slide(make_ome_tiff(tmp_path / "f.ome.tif", image, 0.325))
    mask = tissue_mask(slide)
    bright = image.max(axis=0) > 0.5 * 65535
    ds = slide.thumbnail_downsample
    assert ds == 1.0
    # every bright spot is inside the mask; the dark background mostly outside
    assert mask[bright].mean() > 0.99
    dark = image.max(axis=0) < 0.06 * 65535
    assert mask[dark].mean() < 0.5


def test_signed_fluorescence_below_zero_gets_a_mask(tmp_path: Path) -> None:
    """int16 with most values negative (an offset-subtracted camera): the log-Otsu threshold
    measures from the image's floor instead of taking the log of negative numbers."""
    image = synthetic_tissue((600, 500), seed=3, rgb=False, n_channels=2, dtype=np.uint16)
    signed = (image.astype(np.int32) - 30000).astype(np.int16)
    slide = open_slide(make_ome_tiff(tmp_path / "s.ome.tif", signed, 0.325))
    mask = tissue_mask(slide)
    assert mask[image.max(axis=0) > 0.5 * 65535].mean() > 0.99
    assert mask[image.max(axis=0) < 0.06 * 65535].mean() < 0.5


def test_intensity_stats_are_the_tissue_pixels_moments(tmp_path: Path) -> None:
    image = synthetic_tissue((800, 1100), seed=4)
    slide = open_slide(make_tiff_slide(tmp_path / "s.tif", image, 0.5, pyramid=False))
    mask = tissue_mask(slide)
    assert 0.1 < tissue_fraction(mask) < 0.9
    mean, std = intensity_stats(slide, mask)
    thumb = slide.thumbnail.compute().astype(np.float64)
    np.testing.assert_allclose(mean, thumb[:, mask].mean(axis=1))
    np.testing.assert_allclose(std, thumb[:, mask].std(axis=1))
    # tissue is darker than the white background in every channel
    all_mean, _ = intensity_stats(slide, np.zeros_like(mask))
    assert (mean < all_mean).all()
    with pytest.raises(ValueError, match="does not match"):
        intensity_stats(slide, mask[:-1])


def test_real_svs_tissue_fraction(shared_wsi: Path) -> None:
    slide = open_slide(shared_wsi / "CMU-1-Small-Region.svs")
    mask = tissue_mask(slide)
    assert 0.25 < tissue_fraction(mask) < 0.55
    mean, std = intensity_stats(slide, mask)
    assert (mean < 200).all() and (std > 20).all()


def test_real_ndpi_fluorescence_tissue(shared_wsi: Path) -> None:
    slide = open_slide(shared_wsi / "test3-TRITC-2-560.ndpi")
    mask = tissue_mask(slide)
    assert 0.5 < tissue_fraction(mask) < 0.95
    # the corner outside the section is background
    assert not mask[:20, -20:].any() or not mask[-20:, :20].any()
