"""The GPU path (issue 8, item 3) as far as a machine without a GPU can run it.

Exercised here with real ONNX Runtime sessions on the CPU provider: the precision setting
and its record in ``report.json``; the fp16 copy of a model (its graph, its cache, that
ONNX Runtime loads and runs it); I/O binding (``io_binding`` / ``bind_cpu_input`` /
``run_with_iobinding`` / ``copy_outputs_to_cpu``, output bound to ``"cpu"``); splitting
of batches larger than the GPU batch size; the provider options and TensorRT profile a
GPU session would be given.

Not exercised here (no GPU): that CUDA and TensorRT accept these options, that TensorRT
builds and caches its fp16 engine, that an output bound to ``"cuda"`` works, and any fp16
*arithmetic*. On x86, ONNX Runtime's CPU provider has no fp16 Conv kernels: it wraps the
fp16 nodes in Casts and computes in fp32 (``InsertedPrecisionFreeCast`` nodes in its
optimised graph), so the fp16 copy there is the fp32 computation with fp16-rounded weights.
The tests below assert exactly that, and no more. ``pipelines/gpu_check.sh`` measures the
rest on a lent GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from slides import make_tiff_slide, synthetic_tissue
from tiny_models import _save, make_identity_model, make_tiny_unet

from wsi_deepr import gpu_session, inference
from wsi_deepr.errors import ModelError, OptionError, OutputError
from wsi_deepr.gpu_session import (
    CPU,
    CUDA,
    TENSORRT,
    TrtProfile,
    fp16_model,
    model_precision,
    provider_options,
    resolve_precision,
    trt_cache_dir,
)
from wsi_deepr.inference import Predictor, get_session
from wsi_deepr.report import Report
from wsi_deepr.run import refocus_slide


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch) -> Path:
    """fp16 copies and TensorRT caches go to the test's folder, never to ~/.cache."""
    cache = tmp_path / "trt-cache"
    monkeypatch.setenv("WSI_DEEPR_TRT_CACHE", str(cache))
    return cache


@pytest.fixture
def unet(tmp_path) -> Path:
    return make_tiny_unet(tmp_path / "unet.onnx")


def unet_predictor(path: Path, **settings) -> Predictor:
    return Predictor(str(path), CPU, 1, "input", "output", 3, 2, **settings)


def tiles(n: int = 2, px: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, px, px)).astype(np.float32)


# ----------------------------------------------------------------------------- precision
def test_precision_defaults_to_fp16_on_gpu_providers_and_fp32_on_the_cpu(caplog):
    assert resolve_precision(None, CUDA) == resolve_precision("auto", TENSORRT) == "fp16"
    assert resolve_precision(None, CPU) == resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp32", CUDA) == "fp32"
    with caplog.at_level(logging.WARNING, logger="wsi_deepr"):
        assert resolve_precision("fp16", CPU) == "fp16"
    assert any("fp16 on the CPU" in r.getMessage() for r in caplog.records)
    with pytest.raises(OptionError, match=r"--precision.*'bf16'"):
        resolve_precision("bf16", CUDA)


def test_int8_models_are_never_converted(tmp_path):
    """A QDQ graph keeps its own precision: no fp16 copy is made of it."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["output"]),
    ]
    path = _save(tmp_path / "qdq.onnx", nodes, 3, initializers=[scale, zero])
    assert model_precision(path, "fp16") == model_precision(path, "fp32") == "int8"
    assert model_precision(make_identity_model(tmp_path / "id.onnx"), "fp16") == "fp16"
    # a file that does not parse is left to the session load to report
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage" * 10)
    assert model_precision(broken, "fp16") == "fp16"


# ----------------------------------------------------------------------------- fp16 copy
def test_fp16_copy_keeps_float32_io_with_casts_at_the_boundary(unet, cache_in_tmp):
    converted = fp16_model(unet)
    assert converted.parent == cache_in_tmp / "fp16-models"
    graph = onnx.load(str(converted)).graph
    float_ = TensorProto.FLOAT
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [float_] * 2
    assert {i.data_type for i in graph.initializer} == {TensorProto.FLOAT16}
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert any("input" in n.input for n in casts), "no Cast from the float32 input"
    assert any("output" in n.output for n in casts), "no Cast to the float32 output"
    original = onnx.load(str(unet)).graph
    assert len([n for n in graph.node if n.op_type == "Conv"]) == len(
        [n for n in original.node if n.op_type == "Conv"]
    )


def test_fp16_copy_is_cached_by_the_models_sha256(unet, tmp_path, monkeypatch):
    first = fp16_model(unet)
    same_bytes = tmp_path / "elsewhere" / "copy.onnx"
    same_bytes.parent.mkdir()
    same_bytes.write_bytes(unet.read_bytes())

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    import onnxruntime.transformers.float16 as float16

    monkeypatch.setattr(float16, "convert_float_to_float16", no_conversion)
    assert fp16_model(same_bytes) == first  # same content, same cached file
    other = make_tiny_unet(tmp_path / "other.onnx", seed=1)
    with pytest.raises(ModelError, match=r"other\.onnx: cannot make its fp16 copy"):
        fp16_model(other)  # new content: converted (here: refused by the patch)
    assert not list(first.parent.glob("*.part"))


def test_unwritable_cache_is_a_one_line_output_error_with_a_hint(unet, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WSI_DEEPR_TRT_CACHE", str(blocker / "trt"))
    for make in (lambda: fp16_model(unet), lambda: provider_options([TENSORRT, CPU], "fp16", None)):
        with pytest.raises(OutputError, match=str(blocker)) as caught:
            make()
        line = caught.value.one_line()
        assert "WSI_DEEPR_TRT_CACHE" in line and "\n" not in line
    with pytest.raises(OutputError, match=r"fp16 copy of unet\.onnx"):
        unet_predictor(unet, precision="fp16")(tiles(1, 16))


def test_fp16_on_the_cpu_is_fp32_arithmetic_on_fp16_rounded_weights(unet, tmp_path):
    """What the CPU provider really runs of the fp16 copy (see the module docstring).

    Its output differs from the fp32 model's by the rounding of the weights to fp16 (so
    the fp16 copy ran, not the original), by no more than fp16 allows, and agrees with
    an fp32 model whose weights were rounded to fp16.
    """
    x = tiles(2, 48)
    y32 = unet_predictor(unet)(x)
    y16 = unet_predictor(unet, precision="fp16")(x)
    assert y16.dtype == np.float32 and y16.shape == x.shape
    error = np.abs(y16 - y32)
    scale = np.abs(y32).max()
    assert error.max() > 0, "the fp16 copy gave the fp32 model's output bit for bit"
    assert error.max() < 4e-3 * scale  # fp16's 11-bit mantissa, through 7 layers
    rounded = onnx.load(str(unet))
    for init in rounded.graph.initializer:
        values = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(rounded, str(tmp_path / "rounded.onnx"))
    y_rounded = unet_predictor(tmp_path / "rounded.onnx")(x)
    np.testing.assert_allclose(y16, y_rounded, rtol=0, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- sessions
def test_cpu_sessions_get_no_provider_options_and_gpu_sessions_theirs(cache_in_tmp):
    assert provider_options([CPU], "fp32", None) is None
    profile = TrtProfile("input", 3, 8, 512, 8, "ab" * 32)
    trt, cuda, cpu = provider_options([TENSORRT, CUDA, CPU], "fp16", profile)
    assert trt["trt_fp16_enable"] == "1"
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "1"
    assert trt["trt_engine_cache_path"] == str(cache_in_tmp) and cache_in_tmp.is_dir()
    assert trt["trt_profile_min_shapes"] == "input:1x3x8x8"
    assert trt["trt_profile_opt_shapes"] == trt["trt_profile_max_shapes"] == "input:8x3x512x512"
    assert trt["trt_engine_cache_prefix"] == "wsi_deepr_abababababababab_b8_t512_m8_fp16"
    # another model file of the same architecture gets its own engine
    retrained = provider_options(
        [TENSORRT, CPU], "fp16", TrtProfile("input", 3, 8, 512, 8, "cd" * 32)
    )
    assert retrained[0]["trt_engine_cache_prefix"] != trt["trt_engine_cache_prefix"]
    assert cuda == {
        "device_id": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
    }
    assert cpu == {}
    (fp32_trt, _) = provider_options([TENSORRT, CPU], "fp32", None)
    assert fp32_trt["trt_fp16_enable"] == "0" and "trt_profile_opt_shapes" not in fp32_trt


def test_trt_cache_follows_xdg_cache_home_without_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("WSI_DEEPR_TRT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert trt_cache_dir() == tmp_path / "xdg" / "wsi-deepr" / "trt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert trt_cache_dir() == Path.home() / ".cache" / "wsi-deepr" / "trt"
    assert gpu_session.fp16_cache_dir() == trt_cache_dir() / "fp16-models"


def test_trt_profile_is_the_runs_batch_and_padded_tile(unet):
    predictor = unet_predictor(unet, batch_size=8, tile_px=511)
    assert predictor.trt_profile() == TrtProfile("input", 3, 8, 512, 2)
    assert unet_predictor(unet, batch_size=8).trt_profile() is None


def test_sessions_are_cached_per_precision_and_per_profile_on_tensorrt_only(unet):
    profile = TrtProfile("input", 3, 8, 64, 2)
    fp32 = get_session(unet, CPU, 1)
    assert get_session(unet, CPU, 1, profile=profile) is fp32  # no profile off TensorRT
    fp16 = get_session(unet, CPU, 1, precision="fp16")
    assert fp16 is not fp32
    assert fp16.get_inputs()[0].type == "tensor(float)"
    key_of = {id(s): k for k, s in inference._SESSIONS.items()}
    assert key_of[id(fp16)][3] == "fp16" and key_of[id(fp32)][4] is None


# ----------------------------------------------------------------------------- I/O binding
def test_io_binding_is_bit_identical_to_session_run(unet):
    x = tiles(3, 40, seed=2)
    plain = unet_predictor(unet, io_binding=False)(x)
    bound = unet_predictor(unet, io_binding=True)(x)
    np.testing.assert_array_equal(bound, plain)
    # and the default on the CPU is the plain run (the CPU path is unchanged)
    np.testing.assert_array_equal(unet_predictor(unet)(x), plain)


def test_io_binding_failure_is_a_one_line_model_error(tmp_path):
    """A model that fails while running (a fixed Reshape) fails as one ModelError line."""
    shape = numpy_helper.from_array(np.array([1, 3, 16, 16], np.int64), "shape")
    node = helper.make_node("Reshape", ["input", "shape"], ["output"])
    path = _save(tmp_path / "fixed.onnx", [node], 3, initializers=[shape])
    predictor = Predictor(str(path), CPU, 1, "input", "output", 3, io_binding=True)
    assert predictor(tiles(1, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ModelError, match=r"fixed\.onnx: inference failed") as caught:
        predictor(tiles(2, 16))
    assert "\n" not in str(caught.value)


class CountingSession:
    """A real session that records the batch of every call."""

    def __init__(self, session) -> None:
        self.session, self.batches = session, []

    def run(self, names, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def test_gpu_batches_larger_than_the_batch_size_are_split(tmp_path, monkeypatch):
    """On GPU providers a call never exceeds the batch (TensorRT's profile); the CPU's
    batches go through whole, as before. The session is the real CPU one, counted."""
    one_channel = make_identity_model(tmp_path / "one.onnx", channels=1)
    counting = CountingSession(get_session(one_channel, CPU, 1))
    monkeypatch.setattr(Predictor, "session", lambda self: counting)
    x = tiles(2, 16, seed=3)
    settings = {"batch_size": 4, "io_binding": False}
    cuda = Predictor(str(one_channel), CUDA, 1, "input", "output", 1, **settings)
    # a one-channel model on 3 channels: 2 tiles become 6 images, run as 4 + 2
    np.testing.assert_array_equal(cuda(x), x)
    assert counting.batches == [4, 2]
    counting.batches.clear()
    cpu = Predictor(str(one_channel), CPU, 1, "input", "output", 1, **settings)
    np.testing.assert_array_equal(cpu(x), x)
    assert counting.batches == [6]


# ----------------------------------------------------------------------------- the run
@pytest.fixture
def small_slide(tmp_path) -> Path:
    image = synthetic_tissue((200, 260), seed=4)
    return make_tiff_slide(tmp_path / "small.tif", image, 0.5, pyramid=False)


def test_report_records_the_precision(tmp_path, small_slide, unet):
    common = {"model": unet, "tile_px": 128, "overlap_px": 16, "workers": 1}
    fp32 = refocus_slide(small_slide, tmp_path / "fp32.zarr", **common)
    assert fp32.extra["precision"] == "fp32" and fp32.provider == CPU
    fp16 = refocus_slide(small_slide, tmp_path / "fp16.zarr", precision="fp16", **common)
    stored = Report.read(tmp_path / "fp16.zarr" / "report.json")
    assert stored.extra["precision"] == "fp16"
    with pytest.raises(OptionError, match="--precision"):
        refocus_slide(small_slide, tmp_path / "bad.zarr", precision="half", **common)
    assert not (tmp_path / "bad.zarr").exists()
    assert fp16.tiles_run == fp32.tiles_run > 0


def test_cli_precision_option_reaches_the_report(tmp_path, small_slide, unet):
    from click.testing import CliRunner

    from wsi_deepr.cli.run import run

    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(
        run, [str(small_slide), str(out), "--model", str(unet), "--precision", "fp32", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert Report.read(out / "report.json").extra["precision"] == "fp32"
    bad = CliRunner().invoke(run, [str(small_slide), str(out), "--precision", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output


def test_fp16_cache_is_not_written_for_cpu_fp32_runs(unet, cache_in_tmp):
    unet_predictor(unet)(tiles(1, 16))
    assert not cache_in_tmp.exists()
    assert os.environ["WSI_DEEPR_TRT_CACHE"] == str(cache_in_tmp)
