"""Arithmetic cost of an ONNX model: multiply-accumulates of its Conv, ConvTranspose,
MatMul and Gemm nodes for one input size, counted from the graph's shapes.

The input is fixed to the asked size, shape computations (``Shape -> Mod -> Pad``, as the
exported generators pad to their size multiple) are folded to constants by ONNX Runtime's
basic graph optimisation, and ONNX shape inference gives every node's shapes. Nothing is
timed and no tensor is computed beyond those constants.

Examples
--------
>>> cost = count_macs("models/deepr-he-20x.onnx")  # doctest: +SKIP
>>> round(cost.macs_per_px)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_deepr.errors import ModelError

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
"""Node types whose multiply-accumulates are counted; everything else is taken as free."""


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Multiply-accumulates of one forward pass."""

    input_shape: tuple[int, ...]
    """The ``(n, c, y, x)`` input the count is for."""
    macs: int
    """Multiply-accumulates of the whole pass."""
    macs_by_op: dict[str, int] = field(default_factory=dict)
    """``macs`` split by node type."""

    @property
    def macs_per_px(self) -> float:
        """Multiply-accumulates per input pixel (per image of the batch)."""
        n, _, y, x = self.input_shape
        return self.macs / (n * y * x)

    @property
    def gflop(self) -> float:
        """Floating-point operations of the pass, in 1e9 (one MAC = two FLOP)."""
        return 2.0 * self.macs / 1e9


def count_macs(
    model: str | Path | Any,
    *,
    height_px: int = 512,
    width_px: int = 512,
    batch: int = 1,
    channels: int | None = None,
) -> ModelCost:
    """Count the multiply-accumulates of a model for one input size.

    Parameters
    ----------
    model : str or Path or onnx.ModelProto
        The model (first input taken as the image, ``(n, c, y, x)``).
    height_px, width_px : int
        Input size.
    batch : int
        Images per pass.
    channels : int, optional
        Input channels when the model's channel dimension is dynamic (3 by default).

    Returns
    -------
    ModelCost

    Raises
    ------
    ModelError
        Unreadable model, or a counted node whose shapes stay unknown.
    """
    from onnx import shape_inference

    source = str(model) if isinstance(model, (str, Path)) else "<model>"
    proto = _load(model, source)
    shape = _fix_input(proto, batch, channels, height_px, width_px, source)
    folded = _fold_shapes(proto, source)
    inferred = shape_inference.infer_shapes(folded, data_prop=True)
    shapes = _known_shapes(inferred)
    by_op: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            raise ModelError(source, f"cannot infer the shapes of {node.op_type} {node.name!r}")
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    return ModelCost(input_shape=shape, macs=sum(by_op.values()), macs_by_op=by_op)


def _load(model: str | Path | Any, source: str) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    if not isinstance(model, (str, Path)):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return onnx.load(str(model))
    except (OSError, DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(source, f"not a readable ONNX model ({type(exc).__name__})") from exc


def _fix_input(
    proto: Any, batch: int, channels: int | None, height_px: int, width_px: int, source: str
) -> tuple[int, ...]:
    """Make the image input static and drop stale intermediate shapes (in place)."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not inputs:
        raise ModelError(source, "the model has no input")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelError(source, f"expected an (n, c, y, x) input, found {len(dims)} dimensions")
    fixed_c = dims[1].dim_value if dims[1].HasField("dim_value") else 0
    shape = (batch, channels or fixed_c or 3, height_px, width_px)
    for dim, value in zip(dims, shape, strict=True):
        dim.Clear()
        dim.dim_value = int(value)
    del proto.graph.value_info[:]
    for output in proto.graph.output:
        output.type.tensor_type.ClearField("shape")
    return shape


def _fold_shapes(proto: Any, source: str) -> Any:
    """The model with its shape computations folded (ONNX Runtime, basic level)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="wsi-deepr-cost-") as folder:
        options.optimized_model_filepath = os.path.join(folder, "folded.onnx")
        try:
            ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own unrelated types for every load failure
            raise ModelError(source, f"ONNX Runtime cannot load the model: {exc}") from exc
        return onnx.load(options.optimized_model_filepath)


def _known_shapes(proto: Any) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor whose dimensions are all known."""
    shapes: dict[str, tuple[int, ...]] = {
        t.name: tuple(int(d) for d in t.dims) for t in proto.graph.initializer
    }
    graph = proto.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _node_macs(node: Any, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of one counted node, ``None`` if its shapes are unknown."""
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = shapes.get(node.input[1])
        image = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0])
        if weight is None or image is None:
            return None
        # Conv: every output value sums (c_in / group) x kernel products; the weight holds
        # c_out x (c_in / group) x kernel. ConvTranspose: every input value is scattered
        # through (c_out / group) x kernel products; the weight is c_in x (c_out / group)
        # x kernel. Both: batch x spatial size of that image x the weight's size.
        return image[0] * math.prod(image[2:]) * math.prod(weight)
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    out = shapes.get(node.output[0])
    if a is None or b is None or out is None:
        return None
    if node.op_type == "Gemm":
        trans_a = _int_attribute(node, "transA")
        k = a[0] if trans_a else a[1]
        return math.prod(out) * k
    return math.prod(out) * int(a[-1])  # MatMul: (..., m, k) @ (..., k, n)


def _int_attribute(node: Any, name: str) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return 0
