"""ONNX Runtime sessions, providers, the predictor and model resolution."""

from __future__ import annotations

import json
import logging
import pickle

import dask.array as da
import numpy as np
import pytest
from tiny_models import make_blur_model, make_identity_model, make_scale_model

from wsi_deepr import inference
from wsi_deepr.errors import ModelError, OptionError
from wsi_deepr.inference import CPU, CUDA, Predictor, get_session, plan_threads, select_provider
from wsi_deepr.model_registry import file_sha256, resolve_model
from wsi_deepr.slide import Slide


def make_slide(n_channels: int = 3, *, mpp: float = 0.5, modality: str = "brightfield") -> Slide:
    data = da.zeros((n_channels, 64, 64), dtype=np.uint8)
    names = ("R", "G", "B") if n_channels == 3 else tuple(f"C{i}" for i in range(n_channels))
    return Slide(
        path="memory",
        data=data,
        mpp=mpp,
        channel_names=names,
        channel_colors=("FFFFFF",) * n_channels,
        modality=modality,  # type: ignore[arg-type]
        thumbnail=data,
        thumbnail_downsample=1.0,
        format_name="test",
    )


def predictor_for(path, *, channels=3, size_multiple=1) -> Predictor:
    return Predictor(str(path), CPU, 1, "input", "output", channels, size_multiple)


def test_auto_device_falls_back_to_the_cpu_with_one_line(caplog):
    # onnxruntime-gpu lists CUDA here, but without CUDA libraries it cannot load it.
    inference._PROBED.clear()
    with caplog.at_level(logging.INFO, logger="wsi_deepr"):
        provider = select_provider("auto")
    if provider == CPU:
        lines = [r for r in caplog.records if "CPU" in r.getMessage()]
        assert len(lines) == 1
    assert select_provider("cpu") == CPU


def test_explicit_gpu_device_that_cannot_load_is_an_error():
    if inference.provider_loads(inference.CUDA):
        pytest.skip("CUDA loads on this machine")
    with pytest.raises(ModelError, match="cannot load"):
        select_provider("cuda")
    with pytest.raises(OptionError):
        select_provider("gpu")


def test_session_is_cached_per_model_provider_and_threads(tmp_path):
    path = make_identity_model(tmp_path / "identity.onnx")
    assert get_session(path, CPU, 1) is get_session(path, CPU, 1)
    assert get_session(path, CPU, 1) is not get_session(path, CPU, 2)


def test_predictor_pads_to_the_size_multiple_and_crops_back(tmp_path):
    predictor = predictor_for(make_blur_model(tmp_path / "blur.onnx"), size_multiple=16)
    batch = np.random.default_rng(0).random((2, 3, 37, 50), dtype=np.float32)
    out = predictor(batch)
    assert out.shape == batch.shape and out.dtype == np.float32
    # pickled predictors (as in a Dask graph) hold no session
    assert pickle.loads(pickle.dumps(predictor)) == predictor


def test_one_channel_model_runs_channel_by_channel(tmp_path):
    predictor = predictor_for(make_scale_model(tmp_path / "x2.onnx", factor=2.0), channels=1)
    batch = np.random.default_rng(1).random((2, 5, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(predictor(batch), 2 * batch)


def test_corrupt_onnx_file_is_a_model_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelError, match=r"broken\.onnx"):
        get_session(path, CPU, 1)
    with pytest.raises(ModelError, match=r"broken\.onnx"):
        resolve_model(path, make_slide())


def test_model_with_wrong_channel_count_is_refused(tmp_path):
    path = make_identity_model(tmp_path / "two.onnx", channels=2)
    with pytest.raises(ModelError, match="2 channels"):
        resolve_model(path, make_slide(3))


def test_card_from_onnx_metadata_and_mpp_range(tmp_path, caplog):
    path = make_identity_model(
        tmp_path / "meta.onnx",
        metadata={
            "name": "tiny-he",
            "modality": "brightfield",
            "mpp_range": [0.2, 0.3],
            "size_multiple": 8,
        },
    )
    with caplog.at_level(logging.WARNING, logger="wsi_deepr"):
        resolved = resolve_model(path, make_slide(mpp=0.5))
    assert resolved.card.name == "tiny-he" and resolved.card.size_multiple == 8
    assert len(resolved.sha256) == 64
    assert any("outside the model's range" in r.getMessage() for r in caplog.records)
    with pytest.raises(OptionError, match="outside"):
        resolve_model(path, make_slide(mpp=0.5), strict=True)


def test_default_and_unknown_names_use_the_shipped_models(tmp_path, monkeypatch):
    models = tmp_path / "models"
    make_identity_model(models / "he-identity.onnx")
    (models / "he-identity.json").write_text(
        '{"name": "he-identity", "file": "he-identity.onnx", "modality": "brightfield",'
        ' "channels": ["R", "G", "B"], "in_channels": 3, "input_name": "input",'
        ' "output_name": "output"}'
    )
    monkeypatch.setenv("WSI_DEEPR_MODELS", str(models))
    assert resolve_model(None, make_slide()).card.name == "he-identity"
    assert resolve_model("he-identity", make_slide()).path.name == "he-identity.onnx"
    with pytest.raises(ModelError, match="available: he-identity"):
        resolve_model("nonexistent", make_slide())
    with pytest.raises(ModelError, match="no shipped model for fluorescence"):
        resolve_model(None, make_slide(1, modality="fluorescence"))


def checked(*ssim_delta: float) -> dict:
    """A card's ``validation`` with the int8 check's SSIM change at each defocus."""
    rows = [{"defocus_um": float(k), "ssim_delta": d} for k, d in enumerate(ssim_delta)]
    return {"vs_full": rows}


def test_default_model_is_the_int8_variant_on_the_cpu_only(tmp_path, monkeypatch):
    models = tmp_path / "models"
    card = {"modality": "brightfield", "channels": ["R", "G", "B"], "in_channels": 3}
    full_sha256 = file_sha256(make_identity_model(models / "he-full.onnx"))
    for name, variant, validation in (
        ("he-full", {}, {}),
        (
            "he-full-int8",
            {"precision": "int8", "of": "he-full", "of_sha256": full_sha256},
            checked(-0.004, -0.0099),
        ),
        ("aa-he-other-int8", {"precision": "int8", "of": "aa-he-other"}, checked(0.001, -0.002)),
        # lose too much at one defocus, or record no check: never the default
        ("a-he-lossy-int8", {"precision": "int8", "of": "a-he-lossy"}, checked(-0.003, -0.0101)),
        ("a-he-unchecked-int8", {"precision": "int8", "of": "a-he-unchecked"}, {}),
    ):
        make_identity_model(models / f"{name}.onnx")
        values = {**card, "name": name, "file": f"{name}.onnx", "variant": variant,
                  "validation": validation}  # fmt: skip
        if name == "he-full":
            values["sha256"] = full_sha256
        (models / f"{name}.json").write_text(json.dumps(values))
    monkeypatch.setenv("WSI_DEEPR_MODELS", str(models))
    slide = make_slide()
    # int8 first on the CPU (by name among the int8 variants close to their full model),
    # full precision on GPUs and when the provider is unknown
    assert resolve_model(None, slide, provider=CPU).card.name == "aa-he-other-int8"
    assert resolve_model(None, slide, provider=CUDA).card.name == "he-full"
    assert resolve_model(None, slide).card.name == "he-full"
    # a name is taken as given, whatever the provider
    assert resolve_model("he-full", slide, provider=CPU).card.name == "he-full"
    assert resolve_model("a-he-lossy-int8", slide, provider=CPU).card.name == "a-he-lossy-int8"
    (models / "aa-he-other-int8.json").unlink()
    assert resolve_model(None, slide, provider=CPU).card.name == "he-full-int8"
    (models / "he-full-int8.json").unlink()
    assert resolve_model(None, slide, provider=CPU).card.name == "he-full"
    # where only a variant too far from its full model is shipped, it still runs
    (models / "he-full.json").unlink()
    (models / "a-he-unchecked-int8.json").unlink()
    for provider in (CPU, CUDA, None):
        assert resolve_model(None, slide, provider=provider).card.name == "a-he-lossy-int8"


@pytest.mark.parametrize(
    ("validation", "full_sha256", "fits"),
    [
        ({"vs_full": [{"ssim_delta": -0.004}, {"ssim_delta": 0.009}]}, "abc", True),
        ({"vs_full": [{"ssim_delta": -0.004}, {"ssim_delta": 0.011}]}, "abc", False),
        ({"vs_full": [{"ssim_delta": -0.004}]}, "other", False),  # a check of another model
        ({"vs_full": [{"ssim_delta": -0.004}, {"ssim_delta": None}]}, "abc", False),
        ({"vs_full": [{"ssim_delta": float("nan")}, {"ssim_delta": 0.0}]}, "abc", False),
        ({"vs_full": [{"ssim_delta": 0.0}, {"defocus_um": 1.0}]}, "abc", False),
        ({"vs_full": [{"ssim_delta": 0.0}, None]}, "abc", False),
        ({"vs_full": {"ssim_delta": 0.0}}, "abc", False),
        ({"vs_full": []}, "abc", False),
        ({}, "abc", False),
    ],
)
def test_an_int8_variant_is_the_default_only_with_a_current_check_within_the_slack(
    validation, full_sha256, fits
):
    from wsi_deepr.model_registry import ModelCard, int8_fits_default

    base = {"modality": "brightfield", "channels": ["R", "G", "B"], "in_channels": 3}
    full = ModelCard.from_dict({**base, "name": "m", "file": "m.onnx", "sha256": full_sha256},
                               source="m.json")  # fmt: skip
    variant = ModelCard.from_dict(
        {**base, "name": "m-int8", "file": "m-int8.onnx", "validation": validation,
         "variant": {"precision": "int8", "of": "m", "of_sha256": "abc"}},
        source="m-int8.json",
    )  # fmt: skip
    assert int8_fits_default(variant, full) is fits


def test_threads_fit_the_cores():
    for cores in (1, 2, 3, 8, 16, 64):
        workers, threads = plan_threads(cores=cores)
        assert workers * threads <= cores and workers >= 1 and threads >= 1
