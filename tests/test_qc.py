"""``run --only-blurred``, ``run --qc`` and ``wsi-deepr qc`` end to end.

Real parts throughout: a real H&E scan (CMU-1, read with OpenSlide) with a patch put out
of focus by the physics module, written as a tiled TIFF with its pixel size; the shipped
``deepr-he-20x`` generator through ONNX Runtime; the OME-Zarr the run writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from slides import make_tiff_slide
from test_focus import CMU1, CROP, defocus_patch, ellipse

from wsi_deepr.cli import main
from wsi_deepr.focus import DEFAULT_BLUR_STOPS, focus_map, tiles_needing_model
from wsi_deepr.metrics import ssim
from wsi_deepr.qc import JSON_NAME, PNG_NAME
from wsi_deepr.qc_store import GROUP
from wsi_deepr.readers import open_slide
from wsi_deepr.run import refocus_slide
from wsi_deepr.spectra import scan_slide
from wsi_deepr.tiling import TileGrid, plan_tiles
from wsi_deepr.tissue import tissue_mask

Z_UM = 4.0
PATCH = ((800, 700), (330, 260))


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> dict:
    """CMU-1 crop (ground truth), the same with a 4 um patch, as a TIFF slide."""
    if not CMU1.is_file():
        pytest.skip(f"real slides not available ({CMU1} is absent)")
    slide = open_slide(CMU1)
    truth = np.asarray(slide.data[:, CROP[0], CROP[1]].compute())
    patch = ellipse(truth.shape[1:], *PATCH)
    blurred = defocus_patch(truth, patch, Z_UM, slide.mpp)
    folder = tmp_path_factory.mktemp("qc")
    path = make_tiff_slide(folder / "patch.tif", blurred, slide.mpp, tile=256)
    return {"truth": truth, "input": blurred, "patch": patch, "path": path, "folder": folder}


@pytest.fixture(scope="module")
def runs(patched) -> dict:
    """A full run and an ``--only-blurred --qc`` run of the patched slide."""
    folder = patched["folder"]
    # 512 px tiles: the crop is small, and the CPU's default 1024 px would put the patch
    # under every tile
    options = {"model": "deepr-he-20x", "device": "cpu", "workers": 2, "tile_px": 512}
    full = refocus_slide(patched["path"], folder / "full.zarr", **options)
    only = refocus_slide(
        patched["path"], folder / "only.zarr", only_blurred=DEFAULT_BLUR_STOPS, qc=True, **options
    )
    return {"full": full, "only": only}


def level0(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")["s0"])


def test_only_blurred_runs_the_tiles_over_the_patch_and_leaves_the_rest_bit_for_bit(patched, runs):
    full, only = runs["full"], runs["only"]
    slide = open_slide(patched["path"])
    plan = plan_tiles(
        slide.shape_yx,
        TileGrid(only.tile_px, only.overlap_px),
        mask=tissue_mask(slide),
        mask_downsample=slide.thumbnail_downsample,
    )
    fmap = focus_map(scan_slide(slide, tissue_mask(slide), coarse_spectra=False))
    expected = plan.tissue & tiles_needing_model(fmap, plan)
    assert only.tiles_run == int(expected.sum())
    assert 0 < only.tiles_run < full.tiles_run
    assert only.tiles_run + only.tiles_skipped == full.tiles_run + full.tiles_skipped
    counts = only.extra["focus_qc"]["only_blurred"]
    assert counts["tiles_refocused"] == only.tiles_run
    assert counts["tiles_tissue"] == full.tiles_run

    out = level0(Path(only.output_path))
    ran = np.zeros(slide.shape_yx, dtype=bool)
    for i, j in zip(*np.nonzero(expected), strict=True):
        y, x = int(plan.origins_y[i]), int(plan.origins_x[j])
        ran[y : y + 512, x : x + 512] = True
    assert ran[patched["patch"]].all(), "a part of the patch was not refocused"
    assert (~ran).sum() > 0.3 * ran.size
    np.testing.assert_array_equal(out[:, ~ran], patched["input"][:, ~ran])


def test_only_blurred_matches_the_full_run_on_the_patch(patched, runs):
    """SSIM to the ground truth over the patch's bounding box, full vs selective run."""
    (cy, cx), (ry, rx) = PATCH
    box = (slice(None), slice(cy - ry, cy + ry), slice(cx - rx, cx + rx))
    truth = patched["truth"][box].astype(np.float32)

    def quality(image: np.ndarray) -> float:
        return ssim(image[box].astype(np.float32), truth, data_range=255.0)

    full = quality(level0(Path(runs["full"].output_path)))
    only = quality(level0(Path(runs["only"].output_path)))
    before = quality(patched["input"])
    print(f"SSIM on the patch: input {before:.4f}, full run {full:.4f}, only-blurred {only:.4f}")
    assert abs(full - only) <= 0.01


def test_qc_maps_png_and_figures_are_in_the_store(runs):
    only = runs["only"]
    store = Path(only.output_path)
    qc = only.extra["focus_qc"]
    assert (store / qc["png"]).is_file() and qc["png"] == PNG_NAME
    assert json.loads((store / "report.json").read_text())["extra"]["focus_qc"]["regions"]
    region = qc["regions"][0]
    assert abs(region["defocus_um"] - Z_UM) <= 1.0
    assert qc["reblur_residual"]["cells"] > 0
    assert qc["focus_output"]["cells_judged"] == qc["focus"]["cells_judged"]

    from ome_zarr_models.v05 import Image

    group = zarr.open_group(str(store), mode="r")
    maps = group[GROUP]
    names = set(maps.attrs["wsi_deepr_focus_qc"]["images"])
    assert {"focus_input", "focus_output", "blurred", "defocus_um", "reblur_residual"} <= names
    for name in names:
        Image.from_zarr(maps[name])  # each map is a valid NGFF 0.5 image
    scale = maps["focus_input"].attrs["ome"]["multiscales"][0]["datasets"][0]
    cell_um = qc["focus"]["cell_um"]
    assert scale["coordinateTransformations"][0]["scale"] == [cell_um, cell_um]
    blurred = np.asarray(maps["blurred"]["s0"])
    assert set(np.unique(blurred)) <= {0, 1, 2} and (blurred == 2).sum() > 0
    Image.from_zarr(group)  # the refocused image itself is still valid


def test_qc_command_writes_maps_png_and_json_for_each_slide(tmp_path, patched, capsys):
    sharp = make_tiff_slide(tmp_path / "sharp.tif", patched["truth"], 0.499, tile=256)
    main(["qc", str(patched["path"]), str(sharp), "--out", str(tmp_path / "qc"), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    blurred, in_focus = (json.loads(line) for line in lines)
    assert blurred["focus"]["blurred_fraction"] > 0.1
    assert abs(blurred["regions"][0]["defocus_um"] - Z_UM) <= 1.0
    assert in_focus["focus"]["cells_blurred"] <= 0.005 * in_focus["focus"]["cells_judged"]
    for stem in ("patch", "sharp"):
        folder = tmp_path / "qc" / stem
        assert (folder / PNG_NAME).is_file() and (folder / "focus_qc.zarr").is_dir()
        assert json.loads((folder / JSON_NAME).read_text())["png"] == PNG_NAME

    with pytest.raises(SystemExit) as exit_info:
        main(["qc", str(sharp), "--out", str(tmp_path / "qc" / "sharp")])
    assert exit_info.value.code == 2
    assert "already holds QC results" in capsys.readouterr().err


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_map_images_are_valid_ngff_in_both_versions(tmp_path, ngff):
    """Maps of a small synthetic slide (no shared data needed), written into zarr v3 or v2."""
    from slides import synthetic_tissue

    from wsi_deepr.qc import assess, write_maps

    image = synthetic_tissue((600, 700), seed=3)
    slide = open_slide(make_tiff_slide(tmp_path / "s.tif", image, 0.5, pyramid=False))
    result, _ = assess(slide, tissue_mask(slide))
    group = zarr.open_group(str(tmp_path / "maps.zarr"), mode="w",
                            zarr_format=3 if ngff == "0.5" else 2)  # fmt: skip
    write_maps(group, result)
    if ngff == "0.5":
        from ome_zarr_models.v05 import Image
    else:
        from ome_zarr_models.v04 import Image
    maps = zarr.open_group(str(tmp_path / "maps.zarr"), mode="r")[GROUP]
    for name in ("focus_input", "blurred", "defocus_um", "defocus_fit_rms_db"):
        Image.from_zarr(maps[name])
    level = "s0" if ngff == "0.5" else "0"
    assert maps["focus_input"][level].shape == result.focus_input.score.shape


def test_qc_of_a_blank_slide_reports_nothing_blurred(tmp_path):
    from wsi_deepr.qc import qc_slide

    blank = np.full((3, 512, 512), 240, dtype=np.uint8)
    result = qc_slide(make_tiff_slide(tmp_path / "blank.tif", blank, 0.5), tmp_path / "qc")
    summary = result.summary()
    assert summary["focus"]["cells_judged"] == 0 and summary["regions"] == []
    assert (tmp_path / "qc" / PNG_NAME).is_file()
    assert "0.0% of judged tissue blurred" in result.one_line()


def test_only_blurred_uses_the_model_near_blurred_cells_and_the_input_elsewhere(patched, tmp_path):
    """With a 3x3 blur as the model (its output at a pixel depends on the pixel's
    neighbours only), the selective run must equal the full run wherever the refocus
    weight is 1 and the input, bit for bit, wherever it is 0. The weight is recomputed
    here from the selected cells with a separable window (scipy), not the package's."""
    from scipy.ndimage import convolve1d
    from test_evaluation import HE_CARD
    from tiny_models import make_blur_model

    from wsi_deepr.focus import select_tiles

    model = make_blur_model(tmp_path / "blur.onnx", metadata=HE_CARD)
    options = {"model": model, "device": "cpu", "workers": 2, "tile_px": 512}
    full = refocus_slide(patched["path"], tmp_path / "full.zarr", **options)
    only = refocus_slide(
        patched["path"], tmp_path / "only.zarr", only_blurred=DEFAULT_BLUR_STOPS, **options
    )
    slide = open_slide(patched["path"])
    mask = tissue_mask(slide)
    plan = plan_tiles(slide.shape_yx, TileGrid(only.tile_px, only.overlap_px), mask=mask,
                      mask_downsample=slide.thumbnail_downsample)  # fmt: skip
    selected = select_tiles(
        focus_map(scan_slide(slide, mask, coarse_spectra=False)), plan, crop=True
    )
    assert selected.crops is not None and selected.cells is not None
    assert only.tiles_run == selected.n_run
    assert only.extra["focus_qc"]["only_blurred"]["tiles_cropped"] > 0
    cell = selected.cell_px
    spread = np.repeat(np.repeat(selected.cells.astype(np.float64), cell, 0), cell, 1)
    kernel = np.ones(cell + 1) / cell
    kernel[[0, -1]] = 0.5 / cell
    weight = convolve1d(convolve1d(spread, kernel, axis=0, mode="constant"), kernel, axis=1,
                        mode="constant")[: slide.shape_yx[0], : slide.shape_yx[1]]  # fmt: skip
    out_only = level0(Path(only.output_path)).astype(np.int16)
    out_full = level0(Path(full.output_path)).astype(np.int16)
    given = patched["input"].astype(np.int16)
    outside, inside = weight < 1e-9, weight > 1 - 1e-9
    assert inside.sum() > 0.05 * weight.size and outside.sum() > 0.3 * weight.size
    np.testing.assert_array_equal(out_only[:, outside], given[:, outside])
    assert np.abs(out_only[:, inside] - out_full[:, inside]).max() <= 1
    between = ~outside & ~inside
    low = np.minimum(out_full, given)[:, between] - 1
    high = np.maximum(out_full, given)[:, between] + 1
    assert np.all((out_only[:, between] >= low) & (out_only[:, between] <= high))
