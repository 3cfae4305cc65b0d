"""What a GPU session gets: precision, provider options, the fp16 model, I/O binding.

Issue 8, item 3. A run on CUDA or TensorRT defaults to fp16 (``--precision fp32``
overrides it); a run on the CPU stays fp32 and its sessions are made exactly as before
(no provider options, plain ``session.run``).

- **TensorRT**: the fp32 model with ``trt_fp16_enable``, engine and timing caches in
  :func:`trt_cache_dir`, and one optimisation profile for the run's batch and tile
  (:class:`TrtProfile`), so a model with dynamic height and width gets one engine built
  for the tile actually used instead of rebuilds as shapes come.
- **CUDA**: fp16 is a converted copy of the model
  (``onnxruntime.transformers.float16.convert_float_to_float16``, float32 graph inputs
  and outputs kept), cached in :func:`fp16_cache_dir` under the source model's sha256.
- **int8** (quantised) models are never converted: they run as they are.
- On GPU providers tiles go through ``session.io_binding()``: the input bound from host
  memory, the output allocated on the device and copied back once (:func:`run_bound`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_deepr.errors import ModelError, OptionError, OutputError

if TYPE_CHECKING:
    import onnxruntime as ort

LOG = logging.getLogger("wsi_deepr")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
"""What ``--precision`` takes (besides ``auto``)."""
INT8 = "int8"
"""The precision recorded for a quantised model, which is never converted."""

CACHE_HINT = "set WSI_DEEPR_TRT_CACHE to a writable folder"

CUDNN_CONV_ALGO_SEARCH = "EXHAUSTIVE"
"""cuDNN tries every convolution algorithm once per input shape and keeps the fastest.

A run feeds one tile shape (plus a partial last batch per chunk and the probe tile), so the
search is paid a handful of times per session and then amortised over thousands of tiles;
``HEURISTIC`` saves those seconds but can pick a slower algorithm for every tile after."""

_QUANTISED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
     "MatMulInteger", "DynamicQuantizeLinear"}
)  # fmt: skip


def resolve_precision(precision: str | None, provider: str) -> str:
    """The precision a run gets: ``fp16`` on GPU providers, ``fp32`` on the CPU by default.

    Parameters
    ----------
    precision : {"auto", "fp32", "fp16"} or None
        ``--precision``; ``None`` and ``"auto"`` take the provider's default.
    provider : str
        The ONNX Runtime execution provider.

    Returns
    -------
    str
        ``"fp32"`` or ``"fp16"``.

    Raises
    ------
    OptionError
        An unknown precision.
    """
    if precision in (None, "auto"):
        return "fp32" if provider == CPU else "fp16"
    if precision not in PRECISIONS:
        raise OptionError(
            "--precision", f"must be auto, {' or '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp16" and provider == CPU:
        LOG.warning("--precision fp16 on the CPU: no faster than fp32 there, and less exact")
    return precision


def is_quantised(model_path: str | Path) -> bool:
    """Whether the ONNX graph holds quantisation nodes (an int8 variant).

    A file that does not parse counts as not quantised: loading its session reports it.
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, OSError, ...: the session load says why
        return False
    return any(node.op_type in _QUANTISED_OPS for node in model.graph.node)


def model_precision(model_path: str | Path, wanted: str) -> str:
    """``wanted``, unless the model is quantised: int8 models run as they are (``"int8"``)."""
    if is_quantised(model_path):
        if wanted == "fp16":
            LOG.info("%s is an int8 model: run as it is, not converted to fp16", model_path)
        return INT8
    return wanted


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/wsi-deepr`` (``~/.cache/wsi-deepr`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsi-deepr"


def trt_cache_dir() -> Path:
    """TensorRT engines and timing caches: ``WSI_DEEPR_TRT_CACHE``, else ``cache_root()/trt``."""
    override = os.environ.get("WSI_DEEPR_TRT_CACHE")
    return Path(override).expanduser() if override else cache_root() / "trt"


def fp16_cache_dir() -> Path:
    """Converted fp16 models, next to the TensorRT caches: ``trt_cache_dir()/fp16-models``."""
    return trt_cache_dir() / "fp16-models"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1][:300] if lines else type(exc).__name__


def fp16_model(model_path: str | Path) -> Path:
    """The fp16 copy of an fp32 model, converted on first use and cached by its sha256.

    Graph inputs and outputs stay float32 (``keep_io_types``): Cast nodes at the
    boundary, fp16 weights and arithmetic inside. Written to a temporary name and renamed,
    so workers converting at once never read half a file.

    Parameters
    ----------
    model_path : str or Path
        The fp32 ONNX model.

    Returns
    -------
    Path
        ``fp16_cache_dir() / "<sha256 of the fp32 file>.onnx"``.

    Raises
    ------
    ModelError
        The model cannot be read or converted.
    OutputError
        The cache folder cannot be written (``WSI_DEEPR_TRT_CACHE`` moves it).
    """
    source = Path(model_path)
    try:
        from wsi_deepr.model_registry import file_sha256

        target = fp16_cache_dir() / f"{file_sha256(source)}.onnx"
    except OSError as exc:
        raise ModelError(source, f"cannot be read: {exc.strerror}") from exc
    if target.is_file():
        return target
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    except Exception as exc:  # protobuf, onnx and the converter raise unrelated types
        raise ModelError(source, f"cannot make its fp16 copy: {_one_line(exc)}") from exc
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".onnx.part")
        os.close(handle)
        try:
            onnx.save(converted, temporary)
            os.replace(temporary, target)
        finally:
            Path(temporary).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(
            target.parent,
            f"cannot hold the fp16 copy of {source.name}: {exc.strerror}",
            hint=CACHE_HINT,
        ) from exc
    LOG.info("%s: fp16 copy cached in %s", source.name, target)
    return target


@dataclass(frozen=True, slots=True)
class TrtProfile:
    """One TensorRT optimisation profile: what a run feeds the model's input."""

    input_name: str
    """The model's input tensor."""
    channels: int
    """Channels per image."""
    batch_size: int
    """The most tiles per model call (the run's ``--batch-size``)."""
    tile_px: int
    """The tile edge the run feeds, already a multiple of the model's size multiple."""
    min_px: int = 1
    """The smallest edge it may feed (edge tiles of a small slide, the probe tile)."""
    model_sha256: str = ""
    """The model file's sha256: ONNX Runtime names engines by the graph, not its weights."""

    def shapes(self) -> dict[str, str]:
        """``trt_profile_min/opt/max_shapes``: opt and max are the full batch of tiles."""
        c, n, t = self.channels, self.batch_size, self.tile_px
        low = min(self.min_px, t)
        return {
            "trt_profile_min_shapes": f"{self.input_name}:1x{c}x{low}x{low}",
            "trt_profile_opt_shapes": f"{self.input_name}:{n}x{c}x{t}x{t}",
            "trt_profile_max_shapes": f"{self.input_name}:{n}x{c}x{t}x{t}",
        }

    def prefix(self) -> str:
        """Engine file prefix: one engine per model file, batch and tile.

        ONNX Runtime's own engine name hashes the graph's structure and the file name, not
        the weights: without the model's sha256 here, a retrained model of the same
        architecture (or a file updated in place) would run on the old weights' engine.
        """
        model = self.model_sha256[:16] or "unknown"
        return f"wsi_deepr_{model}_b{self.batch_size}_t{self.tile_px}_m{self.min_px}"


def cuda_options(device_id: int = 0) -> dict[str, str]:
    """CUDA provider options (see :data:`CUDNN_CONV_ALGO_SEARCH`).

    ``do_copy_in_default_stream`` keeps the host-device copies on the compute stream, so
    a bound output is complete when ``run_with_iobinding`` returns.
    """
    return {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH,
        "do_copy_in_default_stream": "1",
    }


def tensorrt_options(
    precision: str, profile: TrtProfile | None, device_id: int = 0
) -> dict[str, str]:
    """TensorRT provider options: fp16, engine and timing caches, the profile.

    Parameters
    ----------
    precision : str
        ``"fp16"`` turns on ``trt_fp16_enable`` (TensorRT picks fp16 kernels where they
        are faster, on the fp32 model); anything else leaves TensorRT in fp32.
    profile : TrtProfile or None
        The shapes the run feeds; ``None`` leaves the shapes to TensorRT (an engine
        rebuilt for every new shape).
    device_id : int
        The CUDA device.

    Returns
    -------
    dict of str to str
    """
    cache = str(trt_cache_dir())
    options = {
        "device_id": str(device_id),
        "trt_fp16_enable": "1" if precision == "fp16" else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache,
    }
    if profile is not None:
        options.update(profile.shapes())
        options["trt_engine_cache_prefix"] = f"{profile.prefix()}_{precision}"
    return options


def provider_options(
    chain: list[str], precision: str, profile: TrtProfile | None, device_id: int = 0
) -> list[dict[str, str]] | None:
    """The ``provider_options`` of a session's provider chain; ``None`` for a CPU session.

    Parameters
    ----------
    chain : list of str
        The providers, in order (e.g. ``[TENSORRT, CUDA, CPU]``).
    precision, profile, device_id
        As :func:`tensorrt_options`.

    Returns
    -------
    list of dict or None
        One dict per provider (the CPU's empty); ``None`` where the chain is the CPU
        alone, so CPU sessions are made exactly as without this module.

    Raises
    ------
    OutputError
        TensorRT's cache folder cannot be created.
    """
    if chain == [CPU]:
        return None
    if TENSORRT in chain:
        try:
            trt_cache_dir().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(trt_cache_dir(), f"cannot be created: {exc.strerror}",
                              hint=CACHE_HINT) from exc  # fmt: skip
    by_provider: dict[str, dict[str, str]] = {
        TENSORRT: tensorrt_options(precision, profile, device_id),
        CUDA: cuda_options(device_id),
    }
    return [by_provider.get(provider, {}) for provider in chain]


def run_bound(
    session: ort.InferenceSession,
    input_name: str,
    output_name: str,
    x: np.ndarray,
    *,
    device: str,
    device_id: int = 0,
) -> np.ndarray:
    """One model call through I/O binding.

    The input is bound from a C-contiguous host array (ONNX Runtime copies it to the
    device once), the output is allocated where the model runs (``device``: ``"cuda"``
    on GPU providers, ``"cpu"`` in tests) and copied to host memory once at the end.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
    input_name, output_name : str
        The model's tensors.
    x : ndarray, float32
        The batch.
    device : {"cuda", "cpu"}
        Where the output is allocated.
    device_id : int
        The device's index.

    Returns
    -------
    ndarray
        The output, in host memory.
    """
    binding = session.io_binding()
    binding.bind_cpu_input(input_name, np.ascontiguousarray(x))
    binding.bind_output(output_name, device, device_id)
    session.run_with_iobinding(binding)
    outputs: list[Any] = binding.copy_outputs_to_cpu()
    return np.asarray(outputs[0])
