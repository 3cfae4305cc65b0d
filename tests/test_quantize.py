"""Static int8 quantisation: output close to fp32, card says int8, calibration on train tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.tiny_models import make_slow_model
from wsi_deepr import pairs
from wsi_deepr.errors import ModelError
from wsi_deepr.model_registry import ModelCard, card_values
from wsi_deepr.quantize import QuantizeSettings, calibration_tiles, quantize_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CARD = {
    "name": "tiny-he",
    "modality": "brightfield",
    "in_channels": 3,
    "defocus_range_um": [-4.0, 4.0],
    "objective_na": 0.75,
    "mpp_range": [0.4, 0.5],
}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("quantize")
    return make_slow_model(folder / "tiny-he.onnx", width=8, n_layers=3, metadata=CARD)


def test_int8_output_close_to_fp32_and_card_says_int8(tiny: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((8, 3, 48, 48)).astype(np.float32)
    out = tmp_path / "tiny-he-int8.onnx"
    card = quantize_model(tiny, out, data_dir=tmp_path, tiles=tiles,
                          settings=QuantizeSettings(per_channel=True))  # fmt: skip
    x = rng.standard_normal((1, 3, 64, 80)).astype(np.float32)
    full, int8 = _run(tiny, x), _run(out, x)
    assert int8.shape == full.shape
    assert float(np.abs(int8 - full).max()) < 0.05 * float(np.abs(full).max())
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == card
    assert written["variant"]["precision"] == "int8"
    assert written["variant"]["of"] == "tiny-he"
    assert written["name"] == "tiny-he-int8" and written["file"] == out.name
    # the registry reads the same card (JSON beside the file) and the graph is quantised
    values, source = card_values(out)
    assert source == out.with_suffix(".json")
    assert ModelCard.from_dict(values, source=source).variant["precision"] == "int8"
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with pytest.raises(ModelError, match="already"):
        quantize_model(out, tmp_path / "again.onnx", data_dir=tmp_path, tiles=tiles)


@pytest.mark.skipif(not (DATA / "he").is_dir(), reason="needs ../shared/data/he")
def test_calibration_tiles_are_train_split_normalised_as_a_run(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[pairs.SourceImage] = []
    load = pairs.load_in_focus

    def spy(source: pairs.SourceImage, modality: str) -> np.ndarray:
        seen.append(source)
        return load(source, modality)

    monkeypatch.setattr(pairs, "load_in_focus", spy)
    values, source = card_values(tiny)
    card = ModelCard.from_dict(values, source=source)
    tiles = calibration_tiles(card, DATA, QuantizeSettings(n_tiles=3, tile_px=64))
    assert tiles.shape == (3, 3, 64, 64) and tiles.dtype == np.float32
    assert len(seen) == 3 and all(pairs.split_of(s) == "train" for s in seen)
    # slide-level normalisation over the tissue: close to zero mean, unit variance
    assert np.all(np.abs(tiles.mean(axis=(2, 3))) < 1.0)
    assert np.all((tiles.std(axis=(2, 3)) > 0.3) & (tiles.std(axis=(2, 3)) < 3.0))


@pytest.mark.skipif(not (DATA / "he").is_dir(), reason="needs ../shared/data/he")
def test_cli_writes_variant_and_refuses_to_overwrite(tiny: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_deepr.cli import cli

    out = tmp_path / "v.onnx"
    args = ["quantize", str(tiny), str(out), "--data-dir", str(DATA), "--tiles", "2",
            "--tile-px", "64", "--no-check"]  # fmt: skip
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["variant"]["precision"] == "int8"
    assert card["variant"]["calibration"]["tiles"] == 2
    assert "train split" in card["variant"]["calibration"]["data"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "exists" in str(again.exception)
