"""Static int8 quantisation of a generator, calibrated on real defocused tiles.

The calibration tiles are what the model sees in a run: in-focus images of the shared
data's *train* split (:func:`wsi_deepr.pairs.split_of`; evaluation images are never
used), put out of focus by :func:`wsi_deepr.pairs.simulate_pair` with the model's own
training simulation (from its card), stored as the slide's integer type and normalised as
``wsi-deepr run`` normalises a slide: each image is taken as a small slide, its tissue
mask and per-channel statistics come from :mod:`wsi_deepr.tissue`, and the model sees
``(x - mean) / std``.

ONNX Runtime's ``quantize_static`` then writes a QDQ (or QOperator) model with uint8
activations and int8 weights (per channel by default), and
:func:`wsi_deepr.export.save_with_card` writes it with a card that says which model it is
the int8 variant of. :func:`compare_with_full` measures its quality against the full
model on held-out images with the evaluation's machinery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_deepr import pairs
from wsi_deepr.errors import InputError, ModelError, OptionError, OutputError
from wsi_deepr.model_registry import ModelCard, card_values, file_sha256

LOG = logging.getLogger("wsi_deepr")

QuantFormat = Literal["QDQ", "QOperator"]
CalibrationMethod = Literal["MinMax", "Percentile", "Entropy"]


@dataclass(frozen=True, slots=True)
class QuantizeSettings:
    """How a model is quantised and calibrated."""

    quant_format: QuantFormat = "QDQ"
    """``QDQ`` (QuantizeLinear/DequantizeLinear pairs, fused by ONNX Runtime) or
    ``QOperator`` (QLinearConv and friends)."""
    per_channel: bool = True
    """One weight scale per output channel (else per tensor)."""
    reduce_range: bool = True
    """7-bit weights: avoids the saturation of AVX2/AVX-512 u8 x s8 products on CPUs
    without VNNI."""
    calibration_method: CalibrationMethod = "MinMax"
    """How activation ranges are chosen from the calibration tiles."""
    n_tiles: int = 32
    """Calibration tiles."""
    tile_px: int = 256
    """Edge of a calibration tile."""
    seed: int = 0
    """Seed of the defocus draws and crops."""
    float_output: bool = True
    """Keep the last convolution and the global residual add in float (the output is
    not rounded to an 8-bit grid)."""


def simulation_settings(card: ModelCard) -> pairs.SimulationSettings:
    """The defocus simulation a model was trained with (from its card).

    Raises
    ------
    ModelError
        The card names no defocus range, NA or pixel-size range.
    """
    values: dict[str, Any] = {
        "defocus_range_um": card.defocus_range_um,
        "na": card.objective_na,
        "mpp_range": card.mpp_range,
    }
    config = card.training.get("config") if isinstance(card.training, dict) else None
    if isinstance(config, dict) and isinstance(config.get("simulation"), dict):
        values.update(config["simulation"])
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ModelError(card.name, f"the model card gives no {', '.join(missing)}",
                         hint="calibration needs the training simulation")  # fmt: skip
    try:
        return pairs.SimulationSettings.from_dict(card.modality, values)
    except TypeError as exc:
        raise ModelError(card.name, f"simulation settings in the card: {exc}") from None


def normalise_like_run(image_cyx: NDArray[np.integer], modality: str) -> NDArray[np.float32]:
    """Normalise an integer image as ``wsi-deepr run`` normalises a slide.

    The image is taken as a one-level slide: tissue mask and per-channel mean and
    standard deviation over the tissue (:func:`wsi_deepr.tissue.tissue_mask`,
    :func:`wsi_deepr.tissue.intensity_stats`), then ``(x - mean) / std`` in float32.

    Parameters
    ----------
    image_cyx : ndarray of shape (C, Y, X), integer
        The image as a slide stores it.
    modality : {"brightfield", "fluorescence"}
        The slide's modality.

    Returns
    -------
    ndarray of shape (C, Y, X), float32
    """
    import dask.array as da

    from wsi_deepr.readers.base import default_channels
    from wsi_deepr.slide import Slide
    from wsi_deepr.tissue import intensity_stats, tissue_mask

    data = da.from_array(image_cyx, chunks=image_cyx.shape)
    names, colors = default_channels(image_cyx.shape[0], rgb=modality == "brightfield")
    slide = Slide("<calibration>", data, float("nan"), names, colors, modality,  # type: ignore[arg-type]
                  data, 1.0, "memory")  # fmt: skip
    mean, std = intensity_stats(slide, tissue_mask(slide))
    tile = image_cyx.astype(np.float32)
    tile -= mean.astype(np.float32)[:, None, None]
    tile /= std.astype(np.float32)[:, None, None]
    return tile


def calibration_tiles(
    card: ModelCard, data_dir: Path, settings: QuantizeSettings
) -> NDArray[np.float32]:
    """Normalised defocused tiles from the train split, as ``wsi-deepr run`` feeds them.

    Parameters
    ----------
    card : ModelCard
        The model's card (modality, channels, training simulation).
    data_dir : Path
        The shared data folder (``he/`` or ``fluo/`` inside).
    settings : QuantizeSettings
        Number and size of tiles, seed.

    Returns
    -------
    ndarray of shape (n_tiles, in_channels, tile_px, tile_px), float32

    Raises
    ------
    InputError
        No train-split images for the modality.
    """
    from wsi_deepr.errors import ConfigError

    simulation = simulation_settings(card)
    try:
        sources = pairs.list_sources(data_dir, card.modality)
    except ConfigError as exc:
        raise InputError(data_dir, exc.problem, hint="pass --data-dir") from None
    train = [s for s in sources if pairs.split_of(s) == "train"]
    if not train:
        raise InputError(data_dir, f"no train-split {card.modality} images")
    rng = np.random.default_rng(settings.seed)
    margin = pairs.simulation_margin_px(simulation)
    scale, dtype = (255.0, np.uint8) if card.modality == "brightfield" else (65535.0, np.uint16)
    order = rng.permutation(len(train))
    tiles = np.empty(
        (settings.n_tiles, card.in_channels, settings.tile_px, settings.tile_px), np.float32
    )
    for i in range(settings.n_tiles):
        source = train[int(order[i % len(train)])]
        image = pairs.load_in_focus(source, card.modality)
        region = pairs.random_region(image, settings.tile_px + 2 * margin, rng)
        defocused, _, _ = pairs.simulate_pair(region, simulation, rng, crop_px=settings.tile_px)
        stored = np.clip(np.rint(defocused * scale), 0, scale).astype(dtype)
        tiles[i] = normalise_like_run(stored, card.modality)[: card.in_channels]
    LOG.info("calibration: %d tiles of %d px from %d train images", settings.n_tiles,
             settings.tile_px, min(settings.n_tiles, len(train)))  # fmt: skip
    return tiles


def tile_reader(input_name: str, tiles: NDArray[np.float32]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` feeding ``tiles`` one at a time.

    Parameters
    ----------
    input_name : str
        The model's input tensor.
    tiles : ndarray of shape (n, c, y, x), float32
        Normalised tiles (:func:`calibration_tiles`).

    Returns
    -------
    onnxruntime.quantization.CalibrationDataReader
    """
    from onnxruntime.quantization import CalibrationDataReader

    class TileReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._next = self._feeds()

        def _feeds(self) -> Iterator[dict[str, NDArray[np.float32]]]:
            for tile in tiles:
                yield {input_name: tile[None]}

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self._next, None)

        def rewind(self) -> None:
            self._next = self._feeds()

    return TileReader()


def _output_nodes(model: Any) -> list[str]:
    """The last Conv before the output and every node after it (kept in float)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    keep: list[str] = []
    frontier = [o.name for o in graph.output]
    seen: set[str] = set()
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        keep.append(node.name)
        if node.op_type == "Conv":
            continue
        # Data flows through the first input; an Add joins two data paths.
        frontier.extend(node.input if node.op_type in ("Add", "Sum") else node.input[:1])
    return keep


def quantize_model(
    model_path: Path,
    out_path: Path,
    *,
    data_dir: Path,
    settings: QuantizeSettings | None = None,
    name: str | None = None,
    tiles: NDArray[np.float32] | None = None,
) -> dict[str, Any]:
    """Quantise a model to int8 and write it with its card.

    Parameters
    ----------
    model_path : Path
        The full-precision ONNX model (its card is read as ``wsi-deepr run`` reads it).
    out_path : Path
        The ``.onnx`` file to write; the card goes beside it as ``.json``.
    data_dir : Path
        Shared data folder for the calibration tiles (train split only).
    settings : QuantizeSettings, optional
        Defaults: QDQ, per-channel, reduced range, MinMax on 32 tiles of 256 px.
    name : str, optional
        The variant's name; default: ``out_path``'s stem.
    tiles : ndarray of shape (n, c, y, x), float32, optional
        Normalised calibration tiles; by default :func:`calibration_tiles` (real ones).

    Returns
    -------
    dict
        The card as written.

    Raises
    ------
    ModelError
        Unreadable model or card, or quantisation failed.
    InputError
        No calibration images.
    OptionError
        Bad settings.
    """
    import onnx
    import onnxruntime
    from onnxruntime import quantization as q

    settings = settings or QuantizeSettings()
    if settings.n_tiles < 1 or settings.tile_px < 16:
        raise OptionError("--tiles", "need at least one calibration tile of 16 px or more")
    values, source = card_values(model_path)
    card = ModelCard.from_dict(values, source=source)
    if card.variant:
        raise ModelError(model_path, f"is already a {card.variant.get('precision')} variant")
    calibrated_on_data = tiles is None
    if tiles is None:
        tiles = calibration_tiles(card, data_dir, settings)
    try:
        full = onnx.load(str(model_path))
    except (OSError, ValueError) as exc:
        raise ModelError(model_path, f"not a readable ONNX model: {exc}") from None
    names = {node.name for node in full.graph.node}
    for i, node in enumerate(full.graph.node):
        if not node.name:  # nodes are excluded by name: every node needs one
            node.name = f"{node.op_type}_{i}"
            while node.name in names:
                node.name += "_"
            names.add(node.name)
    exclude = _output_nodes(full) if settings.float_output else []
    tmp = out_path.with_suffix(".tmp.onnx")
    named = out_path.with_suffix(".named.onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root_level = root.level
    # ORT's quantiser logs advice and int64 shape tensors it skips as root warnings
    root.setLevel(max(root_level, logging.ERROR))
    try:
        onnx.save(full, str(named))
        q.quantize_static(
            str(named),
            str(tmp),
            tile_reader(card.input_name, tiles),
            quant_format=getattr(q.QuantFormat, settings.quant_format),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=getattr(q.CalibrationMethod, settings.calibration_method),
            nodes_to_exclude=exclude,
        )
        quantized = onnx.load(str(tmp))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(model_path, f"quantisation failed: {exc}") from exc
    except OSError as exc:
        raise OutputError(out_path, f"cannot write: {exc.strerror}") from None
    finally:
        root.setLevel(root_level)
        for path in (tmp, named):
            path.unlink(missing_ok=True)
            Path(str(path) + ".data").unlink(missing_ok=True)
    variant_name = name or out_path.stem
    values.update(
        name=variant_name,
        file=out_path.name,
        variant={
            "precision": "int8",
            "of": card.name,
            "of_file": model_path.name,
            "of_sha256": file_sha256(model_path),
            "of_validation": card.validation,
            "method": "onnxruntime.quantization.quantize_static",
            "onnxruntime_version": onnxruntime.__version__,
            "activations": "uint8 (asymmetric)",
            "weights": "int8 (symmetric)",
            "float_nodes": exclude,
            "calibration": {
                "data": f"{card.modality} images of the train split "
                "(wsi_deepr.pairs.split_of) put out of focus by "
                "wsi_deepr.pairs.simulate_pair with the model's training simulation"
                if calibrated_on_data
                else "tiles given by the caller",
                "normalisation": "as wsi-deepr run: tissue mask and per-channel "
                "statistics of each image (wsi_deepr.tissue)",
                "data_dir": str(data_dir),
                "tiles": int(tiles.shape[0]),
                "tile_px": [int(tiles.shape[2]), int(tiles.shape[3])],
            },
            "settings": asdict(settings),
        },
        validation={},
    )
    values.pop("sha256", None)
    from wsi_deepr.export import save_with_card

    return save_with_card(quantized, values, out_path)


def record_quality(
    variant_path: Path, rows: list[dict[str, Any]], *, how: str = "quick held-out subset"
) -> dict[str, Any]:
    """Record :func:`compare_with_full`'s rows in a variant's card (``validation``).

    Rewrites the model file (its ``metadata_props``) and its card; returns the card.
    """
    import onnx

    from wsi_deepr.export import save_with_card

    values, _ = card_values(variant_path)
    values["validation"] = {
        "vs_full": rows,
        "how": f"wsi_deepr.quantize.compare_with_full: {how} of the evaluation",
    }
    return save_with_card(onnx.load(str(variant_path)), values, variant_path)


def compare_with_full(
    full: str | Path,
    variant: str | Path,
    data_dir: Path,
    *,
    quick: bool = True,
    n_fovs: int | None = None,
    threads: int = 2,
) -> list[dict[str, Any]]:
    """Quality of a model variant against the full model at every evaluation defocus.

    Both models refocus the same simulated captures of held-out fields, those of
    ``wsi-deepr evaluate`` (:mod:`wsi_deepr.evaluation`: fields, settings, capture
    seeds, metrics and summary; the rows equal its ``deepr`` rows); the rows give, per
    defocus, the mean SSIM of each against the ground truth, their difference, and the
    mean SSIM of the variant's output against the full model's.

    Parameters
    ----------
    full, variant : str or Path
        Shipped model names or ``.onnx`` paths.
    data_dir : Path
        Shared data folder (held-out images).
    quick : bool
        The evaluation's quick subset (2 fields of 192 px, even defocus steps).
    n_fovs : int, optional
        Fields of view (overrides the subset's count).
    threads : int
        ONNX Runtime threads.

    Returns
    -------
    list of dict
        ``defocus_um``, ``ssim_full``, ``ssim_variant``, ``ssim_delta`` (variant - full),
        ``ssim_variant_vs_full``, ``n``.
    """
    from wsi_deepr import evaluation, metrics

    models = [evaluation.load_model(m, threads=threads) for m in (full, variant)]
    overrides = {"n_fovs": n_fovs} if n_fovs else {}
    settings = evaluation.settings_for(models[0], quick=quick, **overrides)
    fields = evaluation.held_out_fields(data_dir, settings)
    # The evaluation's captures (same seeds) and its "deepr" rows, each capture simulated
    # once and refocused once by each model.
    per_model: tuple[list[dict[str, Any]], ...] = ([], [])
    agreement: dict[float, list[float]] = {}
    for k, (name, target) in enumerate(fields):
        for j, z in enumerate(settings.defocus_um):
            capture = evaluation.simulate_input(
                target, z, settings, seed=evaluation.capture_seed(settings, k, j)
            )
            outputs = [np.clip(m.refocus(capture), 0.0, 1.0) for m in models]
            for rows_of_model, output in zip(per_model, outputs, strict=True):
                rows_of_model.append({"fov": name, "defocus_um": z, "method": "deepr",
                                      **evaluation.quality(output, target)})  # fmt: skip
            agreement.setdefault(z, []).append(metrics.ssim(outputs[1], outputs[0], data_range=1.0))
    by_model = [{s["defocus_um"]: s for s in evaluation.summarise(r)} for r in per_model]
    rows = []
    for z in settings.defocus_um:
        ssim_full = by_model[0][z]["ssim_mean"]
        ssim_variant = by_model[1][z]["ssim_mean"]
        rows.append({
            "defocus_um": z,
            "ssim_full": ssim_full,
            "ssim_variant": ssim_variant,
            "ssim_delta": ssim_variant - ssim_full,
            "ssim_variant_vs_full": float(np.mean(agreement[z])),
            "n": by_model[0][z]["n"],
        })  # fmt: skip
    return rows
