"""Evaluation: whole-image inference by tiles, simulated inputs, quality tables, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from tiny_models import BLUR_3X3, make_blur_model, make_identity_model

from wsi_deepr import evaluation
from wsi_deepr.cli import main
from wsi_deepr.evaluation import EvalSettings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLUO_CARD = {
    "modality": "fluorescence",
    "in_channels": 1,
    "defocus_range_um": [-5.0, 5.0],
    "objective_na": 0.95,
    "mpp_range": [0.15, 0.3],
}
HE_CARD = {
    "modality": "brightfield",
    "in_channels": 3,
    "defocus_range_um": [-10.0, 10.0],
    "objective_na": 0.75,
    "mpp_range": [0.25, 0.5],
}
TEST_SPLIT_NAMES = ("field14.png", "field32.png", "field38.png")
"""File names that :func:`wsi_deepr.pairs.split_of` puts in the test split."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "fluo_blur": make_blur_model(folder / "fluo-blur.onnx", channels=1, metadata=FLUO_CARD),
        "he_identity": make_identity_model(folder / "he-id.onnx", channels=3, metadata=HE_CARD),
        "fluo_identity": make_identity_model(folder / "fl-id.onnx", channels=1, metadata=FLUO_CARD),
    }


def _field(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(ndi.gaussian_filter(rng.random(shape), (0, 1.5, 1.5)) * 2 - 0.4, 0, 1).astype(
        np.float32
    )


def test_identity_model_on_an_image_larger_than_a_tile(tiny: dict[str, Path]) -> None:
    model = evaluation.load_model(tiny["he_identity"])
    assert model.modality == "brightfield" and model.defocus_range_um == (-10.0, 10.0)
    model = dataclasses.replace(model, tile_px=96, overlap_px=16)
    image = _field((3, 200, 230))
    before = image.copy()
    np.testing.assert_allclose(model.refocus(image), image, atol=2e-6)
    np.testing.assert_array_equal(image, before)


def test_blur_model_by_tiles_matches_a_whole_image_convolution(tiny: dict[str, Path]) -> None:
    model = dataclasses.replace(evaluation.load_model(tiny["fluo_blur"]), tile_px=64, overlap_px=16)
    image = _field((1, 150, 170), 1)
    mean, std = image.mean(), image.std()
    expected = ndi.convolve((image[0] - mean) / std, BLUR_3X3, mode="constant") * std + mean
    np.testing.assert_allclose(model.refocus(image)[0], expected, atol=1e-5)


def test_settings_from_the_card(tiny: dict[str, Path]) -> None:
    model = evaluation.load_model(tiny["fluo_blur"])
    full = evaluation.settings_for(model)
    assert full.defocus_um == tuple(float(z) for z in range(-5, 6))
    assert (full.na, full.mpp, full.modality) == (0.95, 0.225, "fluorescence")
    quick = evaluation.settings_for(model, quick=True, n_fovs=1)
    assert quick.defocus_um == (-4.0, -2.0, 0.0, 2.0, 4.0) and quick.n_fovs == 1
    wide = evaluation.settings_for(model, z_max_um=7.0)
    assert wide.defocus_um[0] == -7.0 and wide.defocus_um[-1] == 7.0
    assert evaluation.settings_for(model, mpp=0.17).mpp == 0.17


@pytest.mark.parametrize("modality", ["fluorescence", "brightfield"])
def test_simulated_inputs_lose_quality_with_defocus(modality: str) -> None:
    channels = 1 if modality == "fluorescence" else 3
    target = _field((channels, 64, 64), 2)
    target = ndi.gaussian_filter(target, (0, 1, 1))  # JPEG and the in-focus PSF spare it
    if modality == "brightfield":
        target = 1 - 0.6 * target
    settings = EvalSettings(modality, 0.75, 0.3, (0.0,), photons_at_one=1e6)
    ssims = [
        evaluation.quality(evaluation.simulate_input(target, z, settings, seed=0), target)["ssim"]
        for z in (0.0, 1.0, 3.0)
    ]
    assert ssims[0] > 0.85 and ssims[0] > ssims[1] > ssims[2]
    again = evaluation.simulate_input(target, 1.0, settings, seed=0)
    np.testing.assert_array_equal(again, evaluation.simulate_input(target, 1.0, settings, seed=0))


def test_quality_table_with_an_identity_model(tiny: dict[str, Path]) -> None:
    model = evaluation.load_model(tiny["he_identity"])
    settings = EvalSettings("brightfield", 0.75, 0.4, (-2.0, 0.0, 2.0), crop_px=48)
    fields = [("a", 1 - 0.6 * _field((3, 48, 48), 3)), ("b", 1 - 0.6 * _field((3, 48, 48), 4))]
    rows = evaluation.quality_vs_defocus(
        model, fields, settings, deconvolution_z_um=[2.0], deconvolution_fovs=1
    )
    methods = [r["method"] for r in rows]
    assert methods.count("input") == methods.count("deepr") == 6
    assert {m for m in methods if m.endswith("_crop10")} == {
        "input_crop10",
        "deepr_crop10",
        "rl_crop10",
        "landweber_crop10",
    }
    for i, o in zip(
        (r for r in rows if r["method"] == "input"),
        (r for r in rows if r["method"] == "deepr"),
        strict=True,
    ):
        assert o["ssim"] == pytest.approx(i["ssim"], abs=1e-5)
        assert np.isnan(i["ms_ssim"])  # 48 px is too small for five scales
    summary = evaluation.summarise(rows)
    first = next(s for s in summary if s["method"] == "input" and s["defocus_um"] == -2.0)
    values = [r["ssim"] for r in rows if r["method"] == "input" and r["defocus_um"] == -2.0]
    assert first["n"] == 2
    assert first["ssim_mean"] == pytest.approx(np.mean(values))
    assert first["ssim_std"] == pytest.approx(np.std(values))


def test_tilted_sample_is_sharpest_where_the_tilt_crosses_focus(tiny: dict[str, Path]) -> None:
    model = evaluation.load_model(tiny["fluo_blur"])
    settings = EvalSettings("fluorescence", 0.95, 0.25, (0.0,), crop_px=96)
    rows = evaluation.tilted_sample(
        model, [("f", _field((1, 96, 96), 5))], settings, span_um=6.0, center_defocus_um=(0.0,)
    )
    (row,) = rows
    alpha = np.asarray(row["alpha_input"])
    depth = np.abs(row["defocus_row_um"])
    assert alpha[np.argmin(depth)] > 2 * alpha[np.argmax(depth)]
    assert row["tilt_deg"] == pytest.approx(np.degrees(np.arctan(6.0 / (96 * 0.25))))
    assert len(row["alpha_output"]) == 96


def _fake_data_dir(root: Path) -> Path:
    """A data folder with three held-out fluorescence fields and a training one."""
    folder = root / "fluo" / "dsb2018"
    folder.mkdir(parents=True)
    names = [*TEST_SPLIT_NAMES, "field0.png"]
    lines = ["file,category"]
    for i, name in enumerate(names):
        grey = (255 * _field((1, 200, 210), 10 + i)[0]).astype(np.uint8)
        Image.fromarray(grey).save(folder / name)
        lines.append(f"{name},fluorescence")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_evaluate_quick_writes_the_report(
    tmp_path: Path, tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _fake_data_dir(tmp_path / "data")
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--model",
        str(tiny["fluo_blur"]),
        "--out",
        str(out),
        "--quick",
        "--fovs",
        "2",
    ]
    main([*argv, "--data-dir", str(data)])
    printed = capsys.readouterr().out
    assert "SSIM in" in printed and "+4.0" in printed and "report:" in printed
    for name in ("index.html", "results.json", "quality.csv", "quality_summary.csv", "tilt.csv",
                 "autofocus.csv", "autofocus_summary.csv", "deepr_speed.csv"):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    (model,) = results["models"]
    assert model["fields"] == list(TEST_SPLIT_NAMES[:2])  # only held-out sources
    assert results["provenance"]["command"][:2] == ["wsi-deepr", "evaluate"]
    assert results["provenance"]["versions"]["numpy"]
    assert {r["criterion"] for r in model["autofocus"]} == {"VOL4", "VOL5", "STD", "NVAR"}
    assert model["deepr_speed"]["s_per_mm2"] > 0
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--data-dir", str(data)])
    assert refused.value.code == 2


def test_evaluate_without_models_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WSI_DEEPR_MODELS", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as failed:
        main(["evaluate", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path)])
    assert failed.value.code == 2
    assert "no model given" in capsys.readouterr().err


def test_held_out_fields_come_from_the_test_split() -> None:
    if not (SHARED_DATA / "he").is_dir():
        pytest.skip(f"shared data not available ({SHARED_DATA} is absent)")
    from wsi_deepr import pairs

    settings = EvalSettings("brightfield", 0.75, 0.375, (0.0,), n_fovs=5)
    fields = evaluation.held_out_fields(SHARED_DATA, settings)
    assert len(fields) == 5
    held_out = {
        Path(s.path).name
        for s in pairs.list_sources(SHARED_DATA, "brightfield")
        if pairs.split_of(s) == "test"
    }
    assert all(name in held_out for name, _ in fields)
    assert all(f.shape == (3, 256, 256) for _, f in fields)


def test_real_zstack_ground_truth_is_the_plane_closest_to_the_edof(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    import tifffile

    from wsi_deepr import physics
    from wsi_deepr.evaluation_suite import zstack_quality

    sharp = _field((1, 80, 90), 6)
    optics = (physics.Optics(na=0.75, wavelength_um=0.55, mpp=0.3),)
    heights = np.arange(-6, 5) * 0.5  # in focus at index 6
    stack = np.stack([physics.defocus_image(sharp, z, optics=optics)[0] for z in heights])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, (stack * 60000).astype(np.uint16))
    model = evaluation.load_model(tiny["fluo_identity"])
    rows = zstack_quality(model, path, z_step_um=0.5)
    inputs = [r for r in rows if r["method"] == "input"]
    assert [r["defocus_um"] for r in inputs] == list(heights)
    best = max(inputs, key=lambda r: r["ssim"])
    assert best["defocus_um"] == 0.0 and best["ssim"] == pytest.approx(1.0)
    outputs = [r for r in rows if r["method"] == "deepr"]
    for i, o in zip(inputs, outputs, strict=True):
        assert o["rmse"] == pytest.approx(i["rmse"], abs=1e-4)


def test_targets_and_comparisons_from_results() -> None:
    from wsi_deepr.evaluation_summary import comparisons, table_text, targets

    def q(method: str, z: float, ssim: float) -> dict[str, float | str]:
        return {"method": method, "defocus_um": z, "ssim_mean": ssim, "rmse_mean": 0.1}

    model = {
        "name": "m",
        "fields": ["a"],
        "card": {"defocus_range_um": [-4.0, 4.0]},
        "quality": [
            q("input", 0.0, 0.95), q("deepr", 0.0, 0.94),
            q("input", 2.0, 0.60), q("deepr", 2.0, 0.85),
            q("input", 4.0, 0.40), q("deepr", 4.0, 0.50),
            q("input", 6.0, 0.30), q("deepr", 6.0, 0.30),
            q("deepr_crop10", 2.0, 0.85), q("rl_crop10", 2.0, 0.90),
            q("landweber_crop10", 2.0, 0.848),
        ],
        "autofocus": [{"criterion": "VOL5", "images_mean": 9.0, "s_per_mm2_mean": 5.0,
                       "found_focus_fraction": 1.0}],
        "deepr_speed": {"s_per_mm2": 2.0, "provider": "CPUExecutionProvider"},
    }  # fmt: skip
    met = {(t["target"][:10], t["defocus_um"]): t["met"] for t in targets(model)}
    assert met == {
        ("output SSI", 0.0): True,
        ("SSIM chang", 0.0): True,
        ("output SSI", 2.0): True,
        ("SSIM gain ", 2.0): True,
        ("output SSI", 4.0): False,
        ("SSIM gain ", 4.0): False,
    }
    text = "\n".join(comparisons(model))
    assert "loses to RL" in text and "matches Landweber" in text and "is faster" in text
    assert "+6.0" in table_text(model)


def test_variant_agreement_with_its_full_model() -> None:
    from wsi_deepr.evaluation_summary import variant_agreement

    def model(name: str, ssims: list[float], variant: dict[str, str]) -> dict:
        rows = [{"method": "deepr", "defocus_um": float(z), "ssim_mean": v}
                for z, v in zip((-2, 0, 2), ssims, strict=True)]  # fmt: skip
        return {"name": name, "card": {"variant": variant}, "quality": rows}

    full = model("m", [0.70, 0.90, 0.71], {})
    close = model("m-int8", [0.699, 0.895, 0.712], {"precision": "int8", "of": "m"})
    far = model("m-bad", [0.70, 0.87, 0.71], {"precision": "int8", "of": "m"})
    text = variant_agreement(close, [full, close])
    assert text is not None and "-0.0050 (z = +0 um)" in text and "within 0.01 at every" in text
    far_text = variant_agreement(far, [full, far])
    assert far_text is not None and "-0.0300" in far_text and "NOT within" in far_text
    assert variant_agreement(full, [full, close]) is None  # not a variant
    assert variant_agreement(close, [close]) is None  # its full model was not evaluated


def test_autofocus_on_the_real_bead_stack() -> None:
    from wsi_deepr.evaluation_suite import SuiteOptions, autofocus_real_stack

    if not (SHARED_DATA / "beads" / "bian_bead_image1_crop.tif").is_file():
        pytest.skip(f"real bead stacks not available ({SHARED_DATA / 'beads'} is absent)")
    rows = autofocus_real_stack(SHARED_DATA, SuiteOptions(autofocus_starts=2))
    assert len(rows) == 2 * 4
    assert all(r["found_focus"] for r in rows if r["criterion"] in ("STD", "NVAR"))
    assert all(5 <= r["images"] <= 30 for r in rows)
