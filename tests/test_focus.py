"""Focus map and defocus estimate on real tissue with a simulated out-of-focus patch.

The patch is blurred with :func:`wsi_deepr.physics.defocus_image` and a depth map (``z``
inside an ellipse, 0 outside); pixels outside the ellipse keep the scanned values, so the
rest of the slide is the real in-focus scan. Slides are written as tiled TIFFs with their
real pixel size and read back through :func:`wsi_deepr.readers.open_slide`.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage
from slides import make_tiff_slide, synthetic_tissue

from wsi_deepr import physics
from wsi_deepr.defocus_estimate import estimate_defocus, reblur_residual, region_summary
from wsi_deepr.focus import (
    DEFAULT_BLUR_STOPS,
    FocusMap,
    focus_map,
    tiles_needing_model,
    upsample_cells,
)
from wsi_deepr.readers import open_slide
from wsi_deepr.spectra import scan_slide
from wsi_deepr.tiling import TileGrid, plan_tiles
from wsi_deepr.tissue import tissue_mask

CMU1 = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
CROP = (slice(1424, 2960), slice(400, 1936))
"""A 1536 x 1536 px region of CMU-1 that is mostly tissue."""
NA = 0.75


def ellipse(shape_yx: tuple[int, int], centre: tuple[int, int], radii: tuple[int, int]):
    yy, xx = np.mgrid[: shape_yx[0], : shape_yx[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1.0


def defocus_patch(
    image_u8: np.ndarray,
    patch: np.ndarray,
    z_um: float,
    mpp: float,
    *,
    na: float = NA,
    spherical_waves: float = 0.0,
) -> np.ndarray:
    """The image with ``patch`` put ``z_um`` out of focus (uint8, like a scan), imaged in
    brightfield under Köhler illumination (condenser at 2/3 of the objective's NA)."""
    scan = image_u8.astype(np.float32) / 255.0
    optics = physics.scanner_optics(na, mpp, spherical_waves=spherical_waves)
    depth = np.where(patch, z_um, 0.0)
    blurred = physics.defocus_image(scan, depth, optics=optics, z_step_um=abs(z_um))
    out = np.where(patch, blurred, scan)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cmu1_crop() -> tuple[np.ndarray, float]:
    """Real in-focus H&E (Aperio, 0.499 um/px) read with OpenSlide."""
    if not CMU1.is_file():
        pytest.skip(f"real slides not available ({CMU1} is absent)")
    slide = open_slide(CMU1)
    return np.asarray(slide.data[:, CROP[0], CROP[1]].compute()), slide.mpp


def iou_on_tissue(fmap: FocusMap, truth: np.ndarray) -> float:
    shape = truth.shape
    tissue = upsample_cells(fmap.tissue, fmap.cell_px, shape)
    found = upsample_cells(fmap.blurred(), fmap.cell_px, shape) & tissue
    truth = truth & tissue
    return float((found & truth).sum() / max(1, (found | truth).sum()))


@pytest.mark.parametrize("z_um", [2.0, 3.0, 5.0, 8.0])
def test_map_finds_the_patch_and_its_defocus_on_real_tissue(tmp_path, cmu1_crop, z_um):
    """A patch blurred in brightfield under Köhler illumination is found (IoU >= 0.8) and
    its defocus estimated within 1 um, from 2 to 8 um."""
    image, mpp = cmu1_crop
    patch = ellipse(image.shape[1:], (800, 700), (330, 260))
    path = make_tiff_slide(tmp_path / "patch.tif", defocus_patch(image, patch, z_um, mpp), mpp)
    slide = open_slide(path)
    mask = tissue_mask(slide)
    spectra = scan_slide(slide, mask)
    fmap = focus_map(spectra)
    iou = iou_on_tissue(fmap, patch)
    assert iou >= 0.8, f"IoU {iou:.3f} at z = {z_um} um"
    dmap = estimate_defocus(spectra, fmap, physics.scanner_optics(NA, slide.mpp))
    regions = region_summary(fmap.blurred(), fmap, dmap)
    largest = regions[0]
    print(f"z {z_um} um: IoU {iou:.3f}, estimated {largest['defocus_um']:.2f} um")
    assert abs(largest["defocus_um"] - z_um) <= 1.0, (z_um, largest)
    # the patch is one region; nothing else of any size is flagged
    assert all(r["cells"] <= 4 for r in regions[1:]), regions[1:]


@pytest.mark.parametrize(("na", "z_um"), [(0.70, 5.0), (0.80, 5.0), (0.70, 8.0)])
def test_estimate_holds_when_the_objective_differs_from_the_assumed(tmp_path, cmu1_crop, na, z_um):
    """Blurred through NA 0.70 or 0.80 (condensers at 2/3 of those), estimated with the
    default NA 0.75: the PSF model is not the one that made the blur. (Spherical
    aberration is not tolerated so: it moves the best focus, and 0.1 waves already put
    +5 um at 6.5 um and -5 um at 2.9 um under Köhler illumination.)"""
    image, mpp = cmu1_crop
    patch = ellipse(image.shape[1:], (800, 700), (330, 260))
    blurred = defocus_patch(image, patch, z_um, mpp, na=na)
    slide = open_slide(make_tiff_slide(tmp_path / "other_optics.tif", blurred, mpp))
    spectra = scan_slide(slide, tissue_mask(slide))
    fmap = focus_map(spectra)
    assert iou_on_tissue(fmap, patch) >= 0.8
    dmap = estimate_defocus(spectra, fmap, physics.scanner_optics(NA, slide.mpp))
    estimate = region_summary(fmap.blurred(), fmap, dmap)[0]["defocus_um"]
    print(f"NA {na}, z {z_um} um: estimated {estimate:.2f} um")
    assert abs(estimate - z_um) <= 1.0


def test_in_focus_real_tissue_is_not_flagged(tmp_path, cmu1_crop):
    image, mpp = cmu1_crop
    slide = open_slide(make_tiff_slide(tmp_path / "sharp.tif", image, mpp))
    fmap = focus_map(scan_slide(slide, tissue_mask(slide), coarse_spectra=False))
    assert fmap.judged.sum() > 1000
    assert fmap.blurred().sum() <= 0.005 * fmap.judged.sum()


@pytest.mark.skipif(
    not (SHARED_DATA / "he" / "openslide_crops" / "OS-1-detail.ome.tif").is_file(),
    reason="../shared/data/he is absent",
)
def test_another_scanner_and_pixel_size(tmp_path):
    """An OME-TIFF crop of another slide at 0.227 um/px: the grid scales with mpp."""
    slide = open_slide(SHARED_DATA / "he" / "openslide_crops" / "OS-1-detail.ome.tif")
    image = np.asarray(slide.data.compute())[:3]
    patch = ellipse(image.shape[1:], (550, 550), (400, 330))
    blurred = defocus_patch(image, patch, 4.0, slide.mpp)
    test = open_slide(make_tiff_slide(tmp_path / "os1.tif", blurred, slide.mpp))
    spectra = scan_slide(test, tissue_mask(test))
    fmap = focus_map(spectra)
    assert fmap.cell_px == 72  # 16 um, analysed at 0.454 um/px (2 x 2 means)
    assert iou_on_tissue(fmap, patch) >= 0.8
    dmap = estimate_defocus(spectra, fmap, physics.scanner_optics(NA, test.mpp))
    assert abs(region_summary(fmap.blurred(), fmap, dmap)[0]["defocus_um"] - 4.0) <= 1.0


def test_synthetic_tissue_patch_is_found(tmp_path):
    """Without the shared data: H&E-like synthetic tissue, a 3 um patch."""
    image = synthetic_tissue((896, 896), seed=7)
    mpp = 0.499  # as CMU-1's, so the PSF tables are computed once per session
    patch = ellipse(image.shape[1:], (440, 450), (250, 210))
    slide = open_slide(
        make_tiff_slide(tmp_path / "syn.tif", defocus_patch(image, patch, 3.0, mpp), mpp)
    )
    spectra = scan_slide(slide, tissue_mask(slide))
    fmap = focus_map(spectra)
    assert iou_on_tissue(fmap, patch) >= 0.7
    dmap = estimate_defocus(spectra, fmap, physics.scanner_optics(NA, mpp))
    assert abs(region_summary(fmap.blurred(), fmap, dmap)[0]["defocus_um"] - 3.0) <= 1.5


def test_reblur_residual_separates_true_output_from_invented_structure():
    """The ground truth re-blurred gives the input back; an output with structure that is
    not in the scene (coarse enough to survive the blur) does not; the unchanged input
    sits in between."""
    truth = synthetic_tissue((512, 512), seed=11)
    mpp, z = 0.5, 4.0
    optics = physics.brightfield_optics(NA, mpp)
    blurred = physics.defocus_image(truth.astype(np.float32) / 255, z, optics=optics)
    seen = np.clip(np.rint(blurred * 255), 0, 255).astype(np.uint8)
    from wsi_deepr.defocus_estimate import DefocusMap

    dmap = DefocusMap(128, mpp, np.full((4, 4), z, np.float32), np.zeros((4, 4), np.float32), 1)
    cells = np.zeros((4, 4), dtype=bool)
    cells[1:3, 1:3] = True
    other = synthetic_tissue((512, 512), seed=12)
    invented = ((truth.astype(np.uint16) + other) // 2).astype(np.uint8)

    def residual(output: np.ndarray) -> float:
        values = reblur_residual(seen, output, dmap, optics, cells=cells, full_scale=255.0)
        assert np.isnan(values[~cells]).all()
        return float(np.nanmedian(values))

    exact, unchanged, fake = residual(truth), residual(seen), residual(invented)
    print(f"re-blur residual: exact {exact:.3f}, unchanged {unchanged:.3f}, invented {fake:.3f}")
    assert exact < 0.1
    assert exact < unchanged
    assert fake > 0.5


def test_tiles_needing_model_cover_blurred_cells_only():
    grid = TileGrid(128, 32)
    plan = plan_tiles((512, 512), grid)
    score = np.zeros((16, 16), dtype=np.float32)  # 32 px cells
    score[6:9, 6:9] = -5.0  # pixels 192..288
    fmap = FocusMap(32, 0.5, score, np.ones((16, 16), bool), -4.0)
    need = tiles_needing_model(fmap, plan, grow_cells=0)
    origins = plan.origins_y.tolist()
    assert origins == [0, 96, 192, 288, 384]
    # tiles whose weighted footprint (inside the 8 px margins) reaches pixels 192..287
    expected_1d = np.array([False, True, True, False, False])
    np.testing.assert_array_equal(need, expected_1d[:, None] & expected_1d[None, :])
    assert not tiles_needing_model(FocusMap(32, 0.5, np.zeros_like(score), fmap.tissue, 0.0),
                                   plan).any()  # fmt: skip
    assert fmap.blurred(DEFAULT_BLUR_STOPS).sum() == 9
    assert fmap.blurred(6.0).sum() == 0


def test_lone_blurred_cells_get_no_model_tile():
    grid = TileGrid(128, 32)
    plan = plan_tiles((512, 512), grid)
    score = np.zeros((16, 16), dtype=np.float32)  # 32 px cells
    score[1, 13] = -5.0  # one cell alone, top right
    score[12, 1] = score[13, 2] = -5.0  # two cells touching diagonally, bottom left
    score[7:9, 7:9] = -5.0  # a 2 x 2 region in the middle
    fmap = FocusMap(32, 0.5, score, np.ones((16, 16), bool), -4.0)
    kept = tiles_needing_model(fmap, plan, grow_cells=0)
    only_region = score.copy()
    only_region[1, 13] = only_region[12, 1] = only_region[13, 2] = 0.0
    expected = tiles_needing_model(
        FocusMap(32, 0.5, only_region, fmap.tissue, -4.0), plan, grow_cells=0
    )
    assert expected.any()
    np.testing.assert_array_equal(kept, expected)
    # every blurred cell counts when asked
    every = tiles_needing_model(fmap, plan, grow_cells=0, min_region_cells=1)
    assert every[0, -1] and every[-1, 0] and not kept[0, -1] and not kept[-1, 0]
    # a diagonal pair is one region (8-connected): kept with a threshold of 2
    pair = tiles_needing_model(fmap, plan, grow_cells=0, min_region_cells=2)
    assert pair[-1, 0] and not pair[0, -1]
    # two pairs split by one unjudged cell (glass) are one region of 4 blurred cells
    split = np.zeros((16, 16), dtype=np.float32)
    split[1, 12:14] = -5.0
    split[1, 14] = np.nan
    split[1, 15] = split[2, 15] = -5.0
    gap = tiles_needing_model(FocusMap(32, 0.5, split, fmap.tissue, -4.0), plan, grow_cells=0)
    assert gap[0, -1]
    split[2, 15] = 0.0  # three blurred cells: too few
    assert not tiles_needing_model(FocusMap(32, 0.5, split, fmap.tissue, -4.0), plan).any()


def test_only_blurred_default_in_the_cli_is_the_library_default():
    from wsi_deepr.cli.run import run

    option = next(p for p in run.params if p.name == "only_blurred")
    assert option.flag_value == DEFAULT_BLUR_STOPS
    parsed = run.make_context("run", ["in.tif", "out.zarr", "--only-blurred"]).params
    assert parsed["only_blurred"] == DEFAULT_BLUR_STOPS and not parsed["qc"]
    parsed = run.make_context("run", ["in.tif", "out.zarr", "--only-blurred", "3", "--qc"]).params
    assert parsed["only_blurred"] == 3.0 and parsed["qc"]
    assert run.make_context("run", ["in.tif", "out.zarr"]).params["only_blurred"] is None


def test_scan_measures_tissue_cells_only_and_reads_no_background_block(tmp_path):
    """Tissue cells get the values of a scan of every cell, bit for bit; background cells
    are not computed, and blocks without tissue are not read."""
    image = synthetic_tissue((896, 896), seed=7)
    image[:, :, 520:] = 255  # a background band on the right
    slide = open_slide(make_tiff_slide(tmp_path / "half.tif", image, 0.499))
    mask = tissue_mask(slide)
    reads: list[tuple[slice, ...]] = []

    class Counting:
        """The slide's pixels, recording every region read."""

        shape, dtype = image.shape, image.dtype

        def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
            reads.append(key)
            return image[key]

    block_cells = 2  # blocks of 2 x 2 coarse cells (128 px): many of them are background
    only = scan_slide(slide, mask, data=Counting(), block_cells=block_cells)
    every = scan_slide(slide, mask, cells=np.ones_like(only.tissue), block_cells=block_cells)
    tissue = only.tissue
    assert 0.2 < tissue.mean() < 0.8
    for name in ("log2_ratio", "low_power"):
        assert np.array_equal(getattr(only, name)[tissue], getattr(every, name)[tissue]), name
    assert np.isnan(only.log2_ratio[~tissue]).all() and (only.low_power[~tissue] == 0).all()
    assert np.isfinite(every.log2_ratio[~tissue]).any()  # they would have had values
    measured = np.zeros(only.log_power.shape[:2], dtype=bool)
    ys, xs = np.nonzero(tissue)
    measured[ys // 2, xs // 2] = True  # coarse cells (2 x 2 fine) holding tissue
    assert np.array_equal(only.log_power[measured], every.log_power[measured])
    assert (only.log_power[~measured] == 0).all() and (every.log_power[~measured] != 0).any()
    # one read per block holding a tissue cell, none for the others
    per_block = 2 * block_cells
    padded = np.zeros((-(-tissue.shape[0] // per_block) * per_block,
                       -(-tissue.shape[1] // per_block) * per_block), dtype=bool)  # fmt: skip
    padded[: tissue.shape[0], : tissue.shape[1]] = tissue
    blocks = padded.reshape(padded.shape[0] // per_block, per_block, -1, per_block)
    assert len(reads) == int(blocks.any(axis=(1, 3)).sum()) < blocks.shape[0] * blocks.shape[2]


def test_model_crops_hold_every_blurred_cell_of_a_tile_with_context():
    """Each crop holds the (grown) blurred cells under its tile's footprint, with at least
    the overlap of context wherever the crop ends inside the tile, and a rounded size."""
    from wsi_deepr.focus import model_crops, select_tiles

    grid = TileGrid(512, 64)
    plan = plan_tiles((2048, 2048), grid)
    rng = np.random.default_rng(5)
    score = np.zeros((64, 64), dtype=np.float32)  # 32 px cells
    score[20:31, 5:14] = -5.0  # a region well inside some tiles, crossing others' edges
    score[40:44, 50:62] = -5.0
    score[rng.random(score.shape) < 0.01] = -5.0  # lone cells: ignored
    fmap = FocusMap(32, 0.5, score, np.ones((64, 64), bool), -4.0)
    need = tiles_needing_model(fmap, plan)
    crops = model_crops(fmap, plan)
    grown = ndimage.binary_dilation(fmap.blurred() & ~_lone(fmap.blurred()), iterations=1)
    tile = grid.tile_px
    cropped = 0
    for i, j in zip(*np.nonzero(need), strict=True):
        y, x = int(plan.origins_y[i]), int(plan.origins_x[j])
        y0, y1, x0, x1 = (int(v) for v in crops[i, j])
        assert 0 <= y0 < y1 <= tile and 0 <= x0 < x1 <= tile
        assert (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0
        cropped += (y0, y1, x0, x1) != (0, tile, 0, tile)
        m = grid.margin_px
        pixels = np.repeat(np.repeat(grown, 32, 0), 32, 1)[
            y + m : y + tile - m, x + m : x + tile - m
        ]
        ys, xs = np.nonzero(pixels)
        ys, xs = ys + m, xs + m  # tile coordinates
        for lo, hi, first, last in ((y0, y1, ys.min(), ys.max()), (x0, x1, xs.min(), xs.max())):
            assert lo == 0 or first - lo >= grid.overlap_px
            assert hi == tile or hi - 1 - last >= grid.overlap_px
    assert cropped >= 3
    plan2 = select_tiles(fmap, plan, crop=True)
    assert plan2.n_run == int(need.sum()) and plan2.model_px < plan2.n_run * tile * tile
    assert select_tiles(fmap, plan, crop=False).crops is None


def _lone(blurred: np.ndarray) -> np.ndarray:
    """Blurred cells in regions of fewer than 4 (joined across one-cell gaps)."""
    square = np.ones((3, 3), dtype=bool)
    labels, _ = ndimage.label(ndimage.binary_dilation(blurred, structure=square), square)
    sizes = np.bincount(labels[blurred], minlength=labels.max() + 1)
    return (sizes < 4)[labels] & blurred
