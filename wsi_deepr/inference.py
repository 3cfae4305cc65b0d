"""ONNX Runtime sessions: execution providers, one cached session per worker, prediction.

Sessions are never put into a Dask graph (they cannot be pickled). A :class:`Predictor`
holds only the model path and settings; each worker process creates the session on first
use and keeps it in this module's cache, so it lives as long as the worker.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from wsi_deepr.errors import ModelError, OptionError
from wsi_deepr.gpu_session import (
    CPU,
    CUDA,
    TENSORRT,
    TrtProfile,
    fp16_model,
    model_precision,
    provider_options,
    run_bound,
)

if TYPE_CHECKING:
    import onnxruntime as ort

    from wsi_deepr.model_registry import ResolvedModel

LOG = logging.getLogger("wsi_deepr")

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "tensorrt")

_PROVIDER_OF_DEVICE = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}

_SESSIONS: dict[tuple[str, str, int, str, TrtProfile | None], ort.InferenceSession] = {}
_SESSIONS_LOCK = threading.Lock()
_PROBED: dict[str, bool] = {}


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _provider_chain(provider: str) -> list[str]:
    """Providers to pass to a session, the wanted one first and the CPU last."""
    if provider == TENSORRT:
        return [TENSORRT, CUDA, CPU]
    if provider == CUDA:
        return [CUDA, CPU]
    return [CPU]


def _probe_model_bytes() -> bytes:
    """A one-node Identity model, enough to see whether a provider loads."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def provider_loads(provider: str) -> bool:
    """Whether a session with ``provider`` first really runs on it.

    onnxruntime-gpu lists CUDA and TensorRT even where their libraries are missing and
    then silently falls back to the CPU, so availability is probed with a tiny model.
    """
    if provider == CPU:
        return True
    if provider in _PROBED:
        return _PROBED[provider]
    import onnxruntime as ort

    ok = False
    if provider in ort.get_available_providers():
        options = ort.SessionOptions()
        options.log_severity_level = 4
        ort.set_default_logger_severity(4)  # the failed load logs two loud errors
        try:
            # ORT prints its fallback ("EP Error ...") with print(): keep it off the console.
            with contextlib.redirect_stdout(io.StringIO()):
                session = ort.InferenceSession(
                    _probe_model_bytes(), options, providers=_provider_chain(provider)
                )
            ok = session.get_providers()[0] == provider
        except Exception as exc:  # any failure to load means "not usable"
            LOG.debug("probe of %s failed: %s", provider, exc)
        finally:
            ort.set_default_logger_severity(2)
    _PROBED[provider] = ok
    return ok


def select_provider(device: str) -> str:
    """Execution provider for ``--device``.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "tensorrt"}
        ``auto`` takes TensorRT, then CUDA, when a probe session really loads them, and
        otherwise logs one line that it uses the CPU.

    Returns
    -------
    str
        The ONNX Runtime provider name.

    Raises
    ------
    OptionError
        Unknown device.
    ModelError
        ``cuda`` or ``tensorrt`` asked for explicitly but not loadable here.
    """
    if device not in DEVICES:
        raise OptionError("--device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        for provider in (TENSORRT, CUDA):
            if provider_loads(provider):
                LOG.info("device auto: using %s", provider)
                return provider
        import onnxruntime as ort

        listed = {TENSORRT, CUDA} & set(ort.get_available_providers())
        # A GPU build whose providers do not load deserves a warning; a CPU build does not.
        log = LOG.warning if listed else LOG.info
        log("device auto: no usable GPU provider (CUDA/TensorRT) loads; using the CPU")
        return CPU
    provider = _PROVIDER_OF_DEVICE[device]
    if not provider_loads(provider):
        raise ModelError(
            f"--device {device}",
            f"ONNX Runtime cannot load {provider} on this machine",
            hint="use --device auto or --device cpu",
        )
    return provider


def get_session(
    model_path: str | Path,
    provider: str,
    threads: int,
    *,
    precision: str = "fp32",
    profile: TrtProfile | None = None,
) -> ort.InferenceSession:
    """The cached session of this worker process for a model and its settings.

    Parameters
    ----------
    model_path : str or Path
        The ONNX file.
    provider : str
        The execution provider (:func:`select_provider`).
    threads : int
        ``intra_op_num_threads``.
    precision : {"fp32", "fp16", "int8"}
        ``fp16`` runs the fp16 copy of the model (:func:`wsi_deepr.gpu_session.fp16_model`)
        on CUDA and the CPU, and the fp32 model with ``trt_fp16_enable`` on TensorRT;
        ``fp32`` and ``int8`` run the file as it is.
    profile : TrtProfile, optional
        TensorRT's optimisation profile; ignored by other providers.

    Raises
    ------
    ModelError
        The file is not a loadable ONNX model.
    """
    if provider != TENSORRT:
        profile = None  # one session whatever the tile, as before
    key = (str(model_path), provider, int(threads), precision, profile)
    session = _SESSIONS.get(key)
    if session is not None:
        return session
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = _create_session(key[0], provider, key[2], precision, profile)
            _SESSIONS[key] = session
    return session


def _create_session(
    model_path: str, provider: str, threads: int, precision: str, profile: TrtProfile | None
) -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    chain = _provider_chain(provider)
    # TensorRT makes its own fp16 engine from the fp32 graph; the others run a converted copy.
    converted = precision == "fp16" and provider != TENSORRT
    path = str(fp16_model(model_path)) if converted else model_path
    settings = provider_options(chain, precision, profile)  # None on the CPU: as before
    try:
        return ort.InferenceSession(path, options, providers=chain, provider_options=settings)
    except Exception as exc:  # ORT raises its own unrelated types for every load failure
        raise ModelError(model_path, f"cannot load the ONNX model: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__


def clear_sessions() -> None:
    """Drop the sessions cached in this process (tests, or to free GPU memory)."""
    with _SESSIONS_LOCK:
        _SESSIONS.clear()


@dataclass(frozen=True, slots=True)
class Predictor:
    """Runs batches of normalised tiles through a model; picklable, holds no session."""

    model_path: str
    """The ONNX file."""
    provider: str
    """ONNX Runtime execution provider, e.g. ``"CPUExecutionProvider"``."""
    threads: int
    """``intra_op_num_threads`` of the session."""
    input_name: str
    """Name of the model's input tensor."""
    output_name: str
    """Name of the model's output tensor."""
    in_channels: int
    """Channels the model takes; 1 with a multichannel slide runs channel by channel."""
    size_multiple: int = 1
    """Height and width are padded (reflect) to a multiple of this and cropped back."""
    precision: str = "fp32"
    """``fp32``, ``fp16`` (:func:`get_session`) or ``int8`` (a quantised model as it is)."""
    batch_size: int | None = None
    """The most tiles per model call on a GPU provider (larger batches are split); with
    :attr:`tile_px`, TensorRT's optimisation profile. ``None``: no limit, no profile."""
    tile_px: int | None = None
    """The run's tile edge, for TensorRT's optimisation profile."""
    model_sha256: str = ""
    """The model file's sha256 (names TensorRT's cached engines)."""
    io_binding: bool | None = None
    """Run through I/O binding; ``None``: on GPU providers only (plain ``run`` on the CPU)."""

    @classmethod
    def for_model(
        cls,
        resolved: ResolvedModel,
        *,
        provider: str,
        threads: int,
        precision: str = "fp32",
        batch_size: int | None = None,
        tile_px: int | None = None,
    ) -> Predictor:
        """The predictor of a resolved model; opens its session now, so a bad file fails early.

        Parameters
        ----------
        resolved : ResolvedModel
            The model file and its card (:func:`wsi_deepr.model_registry.resolve_model`).
        provider : str
            Execution provider (:func:`select_provider`).
        threads : int
            ``intra_op_num_threads`` of the session.
        precision : {"fp32", "fp16"}
            Wanted precision (:func:`wsi_deepr.gpu_session.resolve_precision`); a
            quantised model keeps its own (``int8``).
        batch_size : int, optional
            Tiles per model call (:attr:`batch_size`).
        tile_px : int, optional
            The run's tile edge (:attr:`tile_px`).

        Returns
        -------
        Predictor
        """
        card = resolved.card
        predictor = cls(
            model_path=str(resolved.path),
            provider=provider,
            threads=threads,
            input_name=card.input_name,
            output_name=card.output_name,
            in_channels=card.in_channels,
            size_multiple=card.size_multiple,
            precision=model_precision(resolved.path, precision),
            batch_size=batch_size,
            tile_px=tile_px,
            model_sha256=resolved.sha256,
        )
        session = predictor.session()
        check_signature(predictor, session)
        predictor.probe(session)
        return predictor

    def trt_profile(self) -> TrtProfile | None:
        """TensorRT's profile: the batch and the tile padded to the size multiple."""
        if self.batch_size is None or self.tile_px is None:
            return None
        m = max(1, self.size_multiple)
        return TrtProfile(
            self.input_name, self.in_channels, self.batch_size, -(-self.tile_px // m) * m, m,
            self.model_sha256,
        )  # fmt: skip

    def session(self) -> ort.InferenceSession:
        """This worker's session for the predictor's model and settings."""
        return get_session(
            self.model_path,
            self.provider,
            self.threads,
            precision=self.precision,
            profile=self.trt_profile() if self.provider == TENSORRT else None,
        )

    def probe(self, session: ort.InferenceSession) -> None:
        """Run one small blank tile, so a model that cannot work fails before any output.

        The tile is the smallest the model takes (its fixed height and width, if it has
        them); its output must have the input's shape (checked by :meth:`__call__`).

        Raises
        ------
        ModelError
            The model fails to run or returns another shape.
        """
        dims = next(i for i in session.get_inputs() if i.name == self.input_name).shape
        side = max(16, self.size_multiple)
        h, w = (d if isinstance(d, int) and d > 0 else side for d in dims[2:4])
        self(np.zeros((1, self.in_channels, h, w), dtype=np.float32))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Predict a batch.

        Parameters
        ----------
        batch : ndarray of shape (n, c, h, w), float32
            Normalised tiles.

        Returns
        -------
        ndarray of shape (n, c, h, w), float32
        """
        n, c, h, w = batch.shape
        if c != self.in_channels:
            if self.in_channels != 1:
                raise ModelError(
                    self.model_path,
                    f"the model takes {self.in_channels} channels, the slide has {c}",
                )
            # A one-channel model sees every channel as its own image.
            return self(batch.reshape(n * c, 1, h, w)).reshape(n, c, h, w)
        pad_h, pad_w = (-h) % self.size_multiple, (-w) % self.size_multiple
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if pad_h or pad_w:
            mode = "reflect" if min(h, w) > 1 else "edge"
            x = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode=mode)  # type: ignore[call-overload]
        session = self.session()  # a model or cache that fails says so itself
        try:
            y = self._run(session, x)
        except Exception as exc:  # ORT's runtime errors have no common public base
            raise ModelError(self.model_path, f"inference failed: {_first_line(exc)}") from exc
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[1] != x.shape[1]:
            raise ModelError(
                self.model_path, f"output shape {y.shape} does not match input {x.shape}"
            )
        if y.shape[2] < h or y.shape[3] < w:
            raise ModelError(self.model_path, f"output {y.shape} smaller than input {x.shape}")
        return y[:, :, :h, :w]

    def _run(self, session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
        """One model call, or several of at most :attr:`batch_size` tiles on a GPU."""
        step = self.batch_size if self.provider != CPU and self.batch_size else len(x)
        if len(x) > step:
            parts = [self._run(session, x[i : i + step]) for i in range(0, len(x), step)]
            return np.concatenate(parts)
        bound = self.io_binding if self.io_binding is not None else self.provider != CPU
        if bound:
            device = "cpu" if self.provider == CPU else "cuda"
            return run_bound(session, self.input_name, self.output_name, x, device=device)
        (y,) = session.run([self.output_name], {self.input_name: x})
        return np.asarray(y)


def check_signature(predictor: Predictor, session: ort.InferenceSession) -> None:
    """Check the graph's declared input and output against what the predictor will feed.

    A card that contradicts its graph, or a model whose output has another channel count,
    would otherwise fail only at the first tile, with the output store half written.
    Dimensions the graph leaves dynamic are not checked.

    Parameters
    ----------
    predictor : Predictor
        Input and output names and the channel count from the model card.
    session : onnxruntime.InferenceSession
        The loaded model.

    Raises
    ------
    ModelError
        Unknown input or output name, a non-float32 input, a rank other than 4, or a
        fixed channel count that differs from the card's.
    """
    path = predictor.model_path
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if predictor.input_name not in inputs or predictor.output_name not in outputs:
        raise ModelError(
            path,
            f"expected input {predictor.input_name!r} and output {predictor.output_name!r}, "
            f"the graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}",
        )
    x, y = inputs[predictor.input_name], outputs[predictor.output_name]
    if x.type != "tensor(float)":
        raise ModelError(path, f"the model takes {x.type}; wsi-deepr feeds float32 tiles")
    for tensor in (x, y):
        if len(tensor.shape) != 4:
            raise ModelError(path, f"{tensor.name!r} has shape {tensor.shape}, not (n, c, y, x)")
    in_c, out_c = x.shape[1], y.shape[1]
    if isinstance(in_c, int) and in_c != predictor.in_channels:
        raise ModelError(
            path,
            f"the ONNX graph takes {in_c} channels but its card says {predictor.in_channels}",
        )
    if isinstance(out_c, int) and out_c != predictor.in_channels:
        raise ModelError(
            path,
            f"the model returns {out_c} channel{'s' if out_c != 1 else ''} for "
            f"{predictor.in_channels} input channels",
        )


CPU_TILE_PX = 1024
"""Default tile edge on the CPU: with 64 px of overlap it does 13% less model work per
mm2 than 512 px tiles, and the int8 variant gains most there: measured against the full
model at 512 px, int8 at 1024 px gives 1.45x the CPU throughput and int8 at 512 px only
1.23x (``pipelines/bench_variants.py``)."""
SMALL_TILE_PX = 512
"""Default tile edge on GPUs, where tiles are batched (8 per call) instead, and of
selective runs (``--only-blurred``), whose model work is the area of the tiles that touch
a blurred region: half the edge follows its outline more closely (on the benchmark's
slide, 30% of the tissue tiles instead of 36%, ``pipelines/bench_only_blurred.py``)."""


def default_tile_px(provider: str, *, selective: bool = False) -> int:
    """The tile edge a run on ``provider`` gets without ``--tile-px``.

    Parameters
    ----------
    provider : str
        The ONNX Runtime execution provider.
    selective : bool
        Only tiles over blurred tissue go through the model (``--only-blurred``).

    Returns
    -------
    int
    """
    return CPU_TILE_PX if provider == CPU and not selective else SMALL_TILE_PX


def plan_threads(*, workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """Dask worker threads and ORT threads per session such that their product fits.

    Parameters
    ----------
    workers : int, optional
        Dask worker threads; by default 2 on up to 8 cores, else 4.
    cores : int, optional
        Cores available; detected by default.

    Returns
    -------
    (workers, ort_threads) : tuple of int
    """
    cores = cores or available_cores()
    if workers is None:
        workers = min(cores, 2 if cores <= 8 else 4)
    workers = max(1, workers)
    return workers, max(1, cores // workers)
