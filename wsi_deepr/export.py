"""Export a trained generator to ONNX with a model card.

The ONNX graph takes ``input`` of shape ``(n, c, h, w)`` float32 (normalised to zero mean,
unit variance per channel) with dynamic batch, height and width; the generator pads to its
size multiple and crops back inside the graph, so any size works. The card (a JSON file
beside the ``.onnx``, and the same keys JSON-encoded in the ONNX ``metadata_props``) says
what the model is for: modality, channels, defocus range, objective NA, mpp range,
normalisation, training data and licences, iterations, validation figures, version and the
sha256 of the ONNX file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from wsi_deepr import __version__
from wsi_deepr.errors import ConfigError, OutputError

LOG = logging.getLogger("wsi_deepr")

#: Licences of the shared data sets a model may be trained on.
DATASET_LICENCES = {
    "he/camelyon16": "CC0 1.0 (CAMELYON16 patches, DIDSR/DeepLearningCamelyon_II)",
    "he/dsb2018_stained": "CC0 (Data Science Bowl 2018 / BBBC038)",
    "he/kather_tcga_tiles": "CC BY 4.0 (Kather et al. 2018; Komura & Ishikawa 2021)",
    "he/openslide_crops": "OpenSlide test data, freely distributable",
    "fluo/dsb2018": "CC0 (Data Science Bowl 2018 / BBBC038)",
    "fluo/cellprofiler_human": "CC0 (CellProfiler ExampleHuman)",
    "fluo/stardist_img2d": "CC0 (DSB2018 via StarDist)",
}

BRIGHTFIELD_CHANNELS = ("R", "G", "B")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint safely (tensors and plain values only, no pickle code).

    Parameters
    ----------
    path : Path
        ``checkpoint.pt`` written by :func:`wsi_deepr.training.train`.

    Returns
    -------
    dict
        The checkpoint's contents.
    """
    import torch

    try:
        return dict(torch.load(path, weights_only=True, map_location="cpu"))
    except FileNotFoundError:
        raise ConfigError(path, "no such checkpoint") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(path, f"not a wsi-deepr checkpoint ({type(exc).__name__})") from None


def generator_from_checkpoint(checkpoint: dict[str, Any], *, best: bool = True) -> Any:
    """Rebuild the generator of a checkpoint with its best (or last) weights."""
    from wsi_deepr.nets import Generator

    config = checkpoint["config"]
    generator = Generator(
        int(checkpoint["channels"]), tuple(config["widths"]), bool(config["global_residual"])
    )
    weights = checkpoint.get("best_generator") if best else None
    generator.load_state_dict(weights or checkpoint["generator"])
    generator.eval()
    return generator


def model_card(checkpoint: dict[str, Any], *, name: str, onnx_file: str) -> dict[str, Any]:
    """The model card of an exported checkpoint (sha256 filled in by :func:`export_onnx`)."""
    config = checkpoint["config"]
    sim = config.get("simulation", {})
    modality = config["modality"]
    channels = checkpoint["channels"]
    names = list(BRIGHTFIELD_CHANNELS) if channels == 3 else ["intensity"] * channels
    history = checkpoint.get("history") or []
    best = min(history, key=lambda r: r["val_berhu"]) if history else {}
    by_modality = {
        "brightfield": ["he/camelyon16", "he/dsb2018_stained", "he/kather_tcga_tiles",
                        "he/openslide_crops"],
        "fluorescence": ["fluo/dsb2018", "fluo/cellprofiler_human", "fluo/stardist_img2d"],
    }  # fmt: skip
    # A run started from another one (fine-tuning, or an RGB model starting a one-channel
    # one) carries what its start learned from: its data count too.
    modalities = {modality}
    start = _start_modality(config.get("init_from"))
    if start is not None:
        modalities.add(start)
    datasets = [d for m in sorted(modalities) for d in by_modality[m]]
    return {
        "name": name,
        "file": onnx_file,
        "modality": modality,
        "channels": names,
        "in_channels": channels,
        "defocus_range_um": list(sim.get("defocus_range_um", [])),
        "objective_na": sim.get("na"),
        "mpp_range": list(sim.get("mpp_range", [])),
        "size_multiple": 1,
        "input_name": "input",
        "output_name": "output",
        "normalization": (
            "per channel: (x - mean) / std with the input's statistics (slide-level at "
            "inference); output de-normalised with the same mean and std"
        ),
        "architecture": {
            "generator": "residual U-Net",
            "widths": list(config["widths"]),
            "global_residual": config["global_residual"],
        },
        "training": {
            "config": config,
            "iterations": checkpoint["iteration"],
            "datasets": {d: DATASET_LICENCES[d] for d in datasets},
            "initialised_from": config.get("init_from") or None,
            "simulation": _simulation_text(modality, sim),
            "splits": "by source file (wsi_deepr.pairs.split_of); test files never trained on",
            "banks": checkpoint.get("banks"),
            "versions": checkpoint.get("versions"),
        },
        "validation": {k: best.get(k) for k in ("iteration", "val_berhu", "val_msssim", "val_l1")},
        "package_version": __version__,
    }


def _start_modality(init_from: str | None) -> str | None:
    """Modality of the checkpoint a run started from (``None``: none, or not found)."""
    if not init_from or not Path(init_from).is_file():
        return None
    try:
        return str(load_checkpoint(Path(init_from))["config"]["modality"])
    except (ConfigError, KeyError):  # an unreadable start only loses this note in the card
        return None


def export_onnx(
    checkpoint_path: Path, out_path: Path, *, name: str | None = None, best: bool = True
) -> dict[str, Any]:
    """Export a checkpoint's generator to ONNX and write its model card beside it.

    Parameters
    ----------
    checkpoint_path : Path
        Training checkpoint.
    out_path : Path
        The ``.onnx`` file to write; the card goes to the same path with ``.json``.
    name : str, optional
        Model name; default: the file's stem.
    best : bool
        Export the weights with the best validation BerHu (else the last ones).

    Returns
    -------
    dict
        The model card.
    """
    import onnx
    import torch

    checkpoint = load_checkpoint(checkpoint_path)
    generator = generator_from_checkpoint(checkpoint, best=best)
    name = name or out_path.stem
    card = model_card(checkpoint, name=name, onnx_file=out_path.name)
    example = torch.zeros(1, int(checkpoint["channels"]), 64, 80)
    batch, height, width = (torch.export.Dim(n) for n in ("batch", "height", "width"))
    # The exporter's file goes to a scratch folder: the output's folder may not exist yet,
    # and nothing half-written appears beside the output.
    scratch = tempfile.TemporaryDirectory(prefix="wsi-deepr-export-")
    tmp = Path(scratch.name) / "generator.onnx"
    try:
        program = torch.onnx.export(
            generator,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch, 2: height, 3: width},),
            optimize=True,
        )
        assert program is not None
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        model.producer_name = "wsi-deepr"
        model.producer_version = __version__
        onnx.checker.check_model(model)
    finally:
        scratch.cleanup()
    return save_with_card(model, card, out_path)


def _simulation_text(modality: str, sim: dict[str, Any]) -> str:
    """One line naming the physics of the training pairs."""
    condenser = sim.get("condenser_na_range")
    if modality != "brightfield":
        return "wsi_deepr.physics: scalar pupil, incoherent PSF, Poisson-Gaussian noise"
    if condenser:
        lo, hi = condenser
        kernel = f"Köhler illumination (partially coherent, condenser NA {lo:g}-{hi:g})"
    else:
        kernel = "incoherent PSF"
    return f"wsi_deepr.physics: scalar pupil, {kernel}, Poisson-Gaussian noise, JPEG"


def save_with_card(model: Any, card: dict[str, Any], out_path: Path) -> dict[str, Any]:
    """Write an ONNX model with its card in ``metadata_props`` and as ``.json`` beside it.

    The card's keys replace any ``metadata_props`` of the same name (values JSON-encoded);
    its ``sha256`` is set to that of the written ``.onnx`` file (the ONNX metadata cannot
    hold its own file's hash, so it is only in the JSON card).

    Parameters
    ----------
    model : onnx.ModelProto
        The model; its ``metadata_props`` are updated in place.
    card : dict
        Card values (see :class:`wsi_deepr.model_registry.ModelCard`); ``sha256`` is
        filled in.
    out_path : Path
        The ``.onnx`` file; the card goes to the same path with ``.json``.

    Returns
    -------
    dict
        The card as written.

    Raises
    ------
    OutputError
        The files cannot be written.
    """
    import onnx

    card = {k: v for k, v in card.items() if k != "sha256"}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in card]
    del model.metadata_props[:]
    for key, value in [*kept, *((k, json.dumps(v)) for k, v in card.items())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out_path))
        card["sha256"] = hashlib.sha256(out_path.read_bytes()).hexdigest()
        out_path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(out_path, f"cannot write model: {exc.strerror}") from None
    return card


def onnx_parity(generator: Any, onnx_path: Path, shape: tuple[int, ...], seed: int = 0) -> float:
    """Max absolute difference between torch and ONNX Runtime on a random input."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = generator(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    return float(np.abs(np.asarray(got) - expected).max())
