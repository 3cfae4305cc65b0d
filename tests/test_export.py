"""ONNX export: parity with torch on odd sizes, dynamic shapes, model card and metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from wsi_deepr.errors import ConfigError  # noqa: E402
from wsi_deepr.export import export_onnx, generator_from_checkpoint, load_checkpoint  # noqa: E402
from wsi_deepr.nets import Discriminator, Generator  # noqa: E402


def _fake_checkpoint(path: Path, channels: int) -> Path:
    """A checkpoint as training writes it, with random (non-trivial) weights."""
    torch.manual_seed(channels)
    generator = Generator(channels, (6, 8, 10, 12), global_residual=True)
    for p in generator.parameters():
        p.data.normal_(0.0, 0.2)
    torch.save(
        {
            "config": {
                "name": "t",
                "modality": "brightfield" if channels == 3 else "fluorescence",
                "widths": [6, 8, 10, 12],
                "global_residual": True,
                "simulation": {
                    "defocus_range_um": [-5.0, 5.0],
                    "na": 0.95,
                    "mpp_range": [0.15, 0.3],
                },
            },
            "generator": generator.state_dict(),
            "discriminator": Discriminator(channels).state_dict(),
            "best_generator": None,
            "channels": channels,
            "iteration": 7,
            "history": [{"iteration": 7, "val_berhu": 0.5, "val_msssim": 0.8, "val_l1": 0.3}],
            "banks": {},
            "versions": {"torch": str(torch.__version__)},
        },
        path,
    )
    return path


@pytest.fixture(scope="module", params=[1, 3])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(channels, checkpoint, onnx path, card) of one export per channel count."""
    folder = tmp_path_factory.mktemp(f"export{request.param}")
    ckpt = _fake_checkpoint(folder / "c.pt", request.param)
    card = export_onnx(ckpt, folder / "deepr-x.onnx")
    return request.param, ckpt, folder / "deepr-x.onnx", card


def test_onnx_matches_torch_on_odd_sizes(exported) -> None:
    channels, ckpt, onnx_path, card = exported
    generator = generator_from_checkpoint(load_checkpoint(ckpt))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, channels, 300, 421), (2, channels, 17, 64), (3, channels, 128, 95)]:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            expected = generator(torch.from_numpy(x)).numpy()
        (got,) = session.run(["output"], {"input": x})
        assert got.shape == shape
        assert np.abs(got - expected).max() < 1e-4
    assert card["in_channels"] == channels


def test_model_card_and_metadata(exported) -> None:
    channels, _, onnx_path, card = exported
    on_disk = json.loads(onnx_path.with_suffix(".json").read_text())
    assert on_disk == card
    assert card["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert card["name"] == "deepr-x"
    assert card["modality"] == ("fluorescence" if channels == 1 else "brightfield")
    assert card["defocus_range_um"] == [-5.0, 5.0]
    assert card["objective_na"] == 0.95
    assert card["mpp_range"] == [0.15, 0.3]
    assert card["training"]["iterations"] == 7
    datasets = card["training"]["datasets"]
    prefix = "fluo/" if channels == 1 else "he/"
    assert datasets and all(name.startswith(prefix) for name in datasets)
    assert all(licence.strip() for licence in datasets.values())
    kernel = "incoherent PSF"  # the fake checkpoint's simulation has no condenser
    assert kernel in card["training"]["simulation"]
    model = onnx.load(str(onnx_path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["modality"] == card["modality"]
    assert meta["defocus_range_um"] == [-5.0, 5.0]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]


def test_bad_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a wsi-deepr checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_export_creates_the_output_folder_and_leaves_nothing_else(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path / "c.pt", 1)
    out = tmp_path / "new" / "nested" / "m.onnx"
    card = export_onnx(ckpt, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json", "m.onnx"]
    assert card["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 1, 40, 56), dtype=np.float32)
    assert session.run(None, {"input": x})[0].shape == x.shape


def test_card_names_the_koehler_simulation_of_brightfield_training() -> None:
    from wsi_deepr.export import _simulation_text

    text = _simulation_text("brightfield", {"condenser_na_range": [0.3, 0.65]})
    assert "Köhler" in text and "0.3-0.65" in text and "JPEG" in text
    assert "incoherent" in _simulation_text("fluorescence", {})
