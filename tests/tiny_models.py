"""Tiny ONNX models made with ``onnx.helper``, for tests of the inference path.

Each writes ``<name>.onnx`` with a dynamic ``(n, c, y, x)`` input and, optionally, card keys
as ``metadata_props`` (JSON-encoded values, as the exporter writes them).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLUR_3X3 = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32) / 16.0
"""The fixed kernel of :func:`make_blur_model`."""


def _save(path: Path, nodes: list, channels: int | None, *, initializers=(), metadata=None) -> Path:
    dims: list[Any] = ["n", channels if channels else "c", "y", "x"]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)
    graph = helper.make_graph(nodes, path.stem, [x], [y], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_identity_model(path: str | Path, *, channels: int | None = 3, metadata=None) -> Path:
    """``output = input``."""
    return _save(
        Path(path),
        [helper.make_node("Identity", ["input"], ["output"])],
        channels,
        metadata=metadata,
    )


def make_blur_model(path: str | Path, *, channels: int = 3, metadata=None) -> Path:
    """A depthwise 3x3 convolution with :data:`BLUR_3X3`, zero padding of one pixel."""
    weight = np.broadcast_to(BLUR_3X3, (channels, 1, 3, 3)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["input", "w"], ["output"], group=channels, pads=[1, 1, 1, 1], kernel_shape=[3, 3]
    )
    return _save(
        Path(path),
        [node],
        channels,
        initializers=[numpy_helper.from_array(weight, "w")],
        metadata=metadata,
    )


def make_scale_model(path: str | Path, *, factor: float = 2.0, channels: int = 1) -> Path:
    """``output = factor x input``: shows which values went through the model."""
    const = numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")
    node = helper.make_node("Mul", ["input", "k"], ["output"])
    return _save(Path(path), [node], channels, initializers=[const])


def make_slow_identity_model(path: str | Path, *, rounds: int = 8, channels: int = 3) -> Path:
    """``output = input`` exactly, after ``rounds`` matrix products per tile whose result
    is multiplied by zero: a model that takes time (for tests that must act mid-run) but
    whose output does not depend on thread counts or summation order.

    ``z = tanh(x @ x^T)``, then ``rounds`` times ``z = tanh(z @ z)`` (bounded, so never
    inf or NaN); ``output = input + 0 * mean(z)``.
    """
    nodes = [
        helper.make_node("Transpose", ["input"], ["xt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["input", "xt"], ["m0"]),
        helper.make_node("Tanh", ["m0"], ["z0"]),
    ]
    for k in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"z{k}", f"z{k}"], [f"m{k + 1}"]))
        nodes.append(helper.make_node("Tanh", [f"m{k + 1}"], [f"z{k + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"z{rounds}"], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["input", "nothing"], ["output"]),
    ]
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    return _save(Path(path), nodes, channels, initializers=[zero])


def make_slow_model(
    path: str | Path, *, width: int = 16, n_layers: int = 12, metadata=None
) -> Path:
    """A stack of dense 3x3 convolutions that smooth (RGB in and out), with real cost.

    About ``9 x width^2 x n_layers`` multiply-adds per pixel, like a small U-Net, so a
    run takes long enough to be interrupted; each layer averages its inputs with
    :data:`BLUR_3X3`, so values stay in range.
    """
    sizes = [3, *([width] * n_layers), 3]
    nodes, initializers = [], []
    for k, (c_in, c_out) in enumerate(itertools.pairwise(sizes)):
        weight = np.broadcast_to(BLUR_3X3 / c_in, (c_out, c_in, 3, 3)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{k}"))
        source = "input" if k == 0 else f"h{k}"
        target = "output" if k == len(sizes) - 2 else f"h{k + 1}"
        nodes.append(
            helper.make_node(
                "Conv", [source, f"w{k}"], [target], pads=[1, 1, 1, 1], kernel_shape=[3, 3]
            )
        )
    return _save(Path(path), nodes, 3, initializers=initializers, metadata=metadata)


def make_channel_mean_model(path: str | Path, *, channels: int = 3) -> Path:
    """``output = mean over channels``: declares ``(n, 1, y, x)`` for ``(n, channels, y, x)``."""
    path = Path(path)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", channels, "y", "x"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 1, "y", "x"])
    node = helper.make_node("ReduceMean", ["input"], ["output"], axes=[1], keepdims=1)
    graph = helper.make_graph([node], path.stem, [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_unknown_op_model(path: str | Path, *, channels: int = 3) -> Path:
    """A well-formed ONNX file whose one node is an operator no runtime implements."""
    path = Path(path)
    dims: list[Any] = ["n", channels, "y", "x"]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)
    node = helper.make_node("Refocus", ["input"], ["output"], domain="org.example.nowhere")
    graph = helper.make_graph([node], path.stem, [x], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("org.example.nowhere", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_halving_model(path: str | Path, *, channels: int = 3) -> Path:
    """A 2 x 2 average pool with stride 2: the output is half the input's size."""
    node = helper.make_node(
        "AveragePool", ["input"], ["output"], kernel_shape=[2, 2], strides=[2, 2]
    )
    return _save(Path(path), [node], channels)


def make_tiny_unet(path: str | Path, *, width: int = 8, seed: int = 0) -> Path:
    """A two-level residual U-Net (RGB in and out, random weights, size multiple 2).

    3x3 convolutions with LeakyReLU, a 2x2 max pool, a 2x2 transposed convolution, a skip
    concatenation, a 1x1 output convolution and ``output = input + that``: the operators
    of the shipped generators, small enough for a test, with weights whose fp16 rounding
    shows in the output.
    """
    rng = np.random.default_rng(seed)
    nodes: list = []
    initializers: list = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv(x: str, name: str, c_in: int, c_out: int, k: int = 3, relu: bool = True) -> str:
        w = weight(f"{name}_w", (c_out, c_in, k, k), c_in * k * k)
        b = weight(f"{name}_b", (c_out,), c_in * k * k)
        pads = [k // 2] * 4
        out = f"{name}_conv" if relu else name
        nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], pads=pads))
        if not relu:
            return out
        nodes.append(helper.make_node("LeakyRelu", [out], [name], alpha=0.1))
        return name

    top = conv(conv("input", "e1", 3, width), "e2", width, width)
    nodes.append(helper.make_node("MaxPool", [top], ["pool"], kernel_shape=[2, 2], strides=[2, 2]))
    low = conv(conv("pool", "m1", width, 2 * width), "m2", 2 * width, 2 * width)
    up_w = weight("up_w", (2 * width, width, 2, 2), 2 * width)
    nodes.append(
        helper.make_node("ConvTranspose", [low, up_w], ["up"], kernel_shape=[2, 2], strides=[2, 2])
    )
    nodes.append(helper.make_node("Concat", [top, "up"], ["cat"], axis=1))
    dec = conv(conv("cat", "d1", 2 * width, width), "d2", width, width)
    residual = conv(dec, "head", width, 3, k=1, relu=False)
    nodes.append(helper.make_node("Add", ["input", residual], ["output"]))
    return _save(Path(path), nodes, 3, initializers=initializers, metadata={"size_multiple": 2})
