"""MAC counting from the ONNX graph against hand-computed counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.tiny_models import make_blur_model, make_identity_model, make_slow_model
from wsi_deepr.errors import ModelError
from wsi_deepr.model_cost import count_macs


def _conv_up_matmul_model(path: Path) -> Path:
    """Conv 3->8 (3x3, stride 2, pad 1), ConvTranspose 8->4 (2x2, stride 2), then a
    MatMul of the last axis with a (w, 5) matrix; input fixed to (1, 3, 32, 32)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((8, 4, 2, 2)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((32, 5)).astype(np.float32), "m"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["a"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["a", "w2"], ["b"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("MatMul", ["b", "m"], ["output"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "cost",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_conv_convtranspose_matmul_by_hand(tmp_path: Path) -> None:
    path = _conv_up_matmul_model(tmp_path / "cost.onnx")
    cost = count_macs(path, height_px=32, width_px=32)
    conv = 16 * 16 * 8 * 3 * 3 * 3  # output pixels x c_out x c_in x kernel
    up = 16 * 16 * 8 * 4 * 2 * 2  # input pixels x c_in x c_out x kernel
    matmul = 4 * 32 * 5 * 32  # output (4 x 32 x 5) x k (32)
    assert cost.macs_by_op == {"Conv": conv, "ConvTranspose": up, "MatMul": matmul}
    assert cost.macs == conv + up + matmul
    assert cost.macs_per_px == pytest.approx((conv + up + matmul) / 32**2)
    assert cost.gflop == pytest.approx(2 * cost.macs / 1e9)


def test_dynamic_models_scale_with_input(tmp_path: Path) -> None:
    blur = count_macs(make_blur_model(tmp_path / "blur.onnx"), height_px=64, width_px=48)
    assert blur.input_shape == (1, 3, 64, 48)
    assert blur.macs == 64 * 48 * 3 * 1 * 9  # depthwise: one input channel per output
    slow = count_macs(make_slow_model(tmp_path / "slow.onnx", width=8, n_layers=3), batch=2)
    per_px = 3 * 8 * 9 + 2 * 8 * 8 * 9 + 8 * 3 * 9
    assert slow.macs == 2 * 512 * 512 * per_px
    assert slow.macs_per_px == per_px


def test_no_counted_nodes_and_bad_files(tmp_path: Path) -> None:
    assert count_macs(make_identity_model(tmp_path / "id.onnx")).macs == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        count_macs(bad)
