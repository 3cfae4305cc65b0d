"""Shipped models, their cards, and the choice of a model for a slide.

Shipped models live in ``<repo>/models/<name>.onnx`` with a card ``<name>.json`` beside
it (override the folder with the environment variable ``WSI_DEEPR_MODELS``). A model given
as a path without a card gets one from the ONNX ``metadata_props`` (the exporter writes
the card's keys there, values JSON-encoded), else defaults inferred from its input shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wsi_deepr
from wsi_deepr.errors import ModelError, OptionError
from wsi_deepr.evaluation_summary import VARIANT_SLACK

if TYPE_CHECKING:
    from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")

MODELS_ENV = "WSI_DEEPR_MODELS"


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What is known about a generator: what it takes, for which slides, from where."""

    name: str
    """Short name, e.g. ``"deepr-he-small"``."""
    file: str
    """ONNX file name, relative to the card."""
    modality: str
    """``"brightfield"`` or ``"fluorescence"``."""
    channels: tuple[str, ...]
    """Channel names the model was trained on."""
    in_channels: int
    """Channels of the model's input tensor."""
    defocus_range_um: tuple[float, float] | None = None
    """Defocus distances the model was trained for, in micrometres."""
    objective_na: float | None = None
    """Numerical aperture of the training objective."""
    mpp_range: tuple[float, float] | None = None
    """Pixel sizes (um/px) the model suits."""
    size_multiple: int = 1
    """Height and width must be a multiple of this (1 if the model pads itself)."""
    normalization: str = "slide-level zero mean, unit variance per channel"
    """How inputs are normalised."""
    input_name: str = "input"
    """Input tensor name."""
    output_name: str = "output"
    """Output tensor name."""
    sha256: str = ""
    """SHA-256 of the ONNX file."""
    training: dict[str, Any] = field(default_factory=dict)
    """Training data and settings."""
    validation: dict[str, Any] = field(default_factory=dict)
    """Validation figures."""
    package_version: str = ""
    """wsi-deepr version that exported the model."""
    variant: dict[str, Any] = field(default_factory=dict)
    """How the model derives from another one (e.g. ``{"precision": "int8", "of": ...}``
    for a quantised copy, see :mod:`wsi_deepr.quantize`); empty for a trained model."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | Path) -> ModelCard:
        """Build a card from JSON values, ignoring unknown keys.

        Raises
        ------
        ModelError
            A required field is missing or has the wrong type.
        """
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        try:
            for key in ("channels",):
                if key in kwargs:
                    kwargs[key] = tuple(str(v) for v in kwargs[key])
            for key in ("defocus_range_um", "mpp_range"):
                if kwargs.get(key) is not None:
                    lo, hi = kwargs[key]
                    kwargs[key] = (float(lo), float(hi))
            for key in ("in_channels", "size_multiple"):
                if key in kwargs:
                    kwargs[key] = int(kwargs[key])
            if kwargs.get("objective_na") is not None:
                kwargs["objective_na"] = float(kwargs["objective_na"])
            card = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelError(source, f"invalid model card: {exc}") from exc
        if card.modality not in ("brightfield", "fluorescence"):
            raise ModelError(source, f"unknown modality {card.modality!r} in the model card")
        if card.in_channels < 1 or card.size_multiple < 1:
            raise ModelError(source, "in_channels and size_multiple must be >= 1")
        return card

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model file and its card, checked to fit a slide."""

    card: ModelCard
    """The card (shipped, from ONNX metadata, or inferred)."""
    path: Path
    """The ONNX file."""
    sha256: str
    """SHA-256 of the file as read now."""


def models_dir() -> Path:
    """Folder of the shipped models (``$WSI_DEEPR_MODELS`` overrides it)."""
    override = os.environ.get(MODELS_ENV)
    if override:
        return Path(override)
    return Path(wsi_deepr.__file__).resolve().parent.parent / "models"


def shipped_cards() -> dict[str, tuple[ModelCard, Path]]:
    """Cards of the shipped models by name, each with the path of its ONNX file."""
    folder = models_dir()
    cards: dict[str, tuple[ModelCard, Path]] = {}
    if not folder.is_dir():
        return cards
    for card_path in sorted(folder.glob("*.json")):
        values = _read_json_card(card_path)
        values.setdefault("name", card_path.stem)
        values.setdefault("file", card_path.stem + ".onnx")
        card = ModelCard.from_dict(values, source=card_path)
        onnx_path = card_path.parent / card.file
        if onnx_path.is_file():
            cards[card.name] = (card, onnx_path)
    return cards


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_from_onnx(
    path: Path, *, default_channels: int = 3, default_modality: str | None = None
) -> ModelCard:
    """A card for an ONNX file: its ``metadata_props`` if present, else inferred defaults.

    Parameters
    ----------
    path : Path
        The ONNX file.
    default_channels : int
        Channels assumed when the input's channel dimension is dynamic.
    default_modality : str, optional
        Modality assumed when the metadata gives none (by default: brightfield for three
        channels, else fluorescence).

    Raises
    ------
    ModelError
        The file is not a readable ONNX model.
    """
    values = onnx_card_values(
        path, default_channels=default_channels, default_modality=default_modality
    )
    return ModelCard.from_dict(values, source=path)


def card_values(
    path: Path, *, default_channels: int = 3, default_modality: str | None = None
) -> tuple[dict[str, Any], Path]:
    """The raw card values of an ONNX file, unknown keys included, and where they came from.

    The JSON card beside the file (``<stem>.json``) if there is one, else the ONNX
    ``metadata_props`` and inferred defaults (:func:`onnx_card_values`).

    Parameters
    ----------
    path : Path
        The ONNX file.
    default_channels, default_modality
        As :func:`card_from_onnx`, for a file without a card.

    Returns
    -------
    values : dict
        ``name`` defaults to the file's stem; ``file`` is the file's name.
    source : Path
        The JSON card or the ONNX file.

    Raises
    ------
    ModelError
        Unreadable card or model.
    """
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        values = onnx_card_values(
            path, default_channels=default_channels, default_modality=default_modality
        )
        return values, path
    values = _read_json_card(card_path)
    values.setdefault("name", path.stem)
    values["file"] = path.name
    return values, card_path


def _read_json_card(card_path: Path) -> dict[str, Any]:
    try:
        values = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(card_path, f"unreadable model card: {exc}") from exc
    if not isinstance(values, dict):
        raise ModelError(card_path, "a model card must be a JSON object")
    return values


def onnx_card_values(
    path: Path, *, default_channels: int = 3, default_modality: str | None = None
) -> dict[str, Any]:
    """Card values from an ONNX file's ``metadata_props`` over defaults from its input.

    Raises
    ------
    ModelError
        The file is not a readable ONNX model.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(path, f"not a readable ONNX model ({type(exc).__name__})") from exc
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelError(path, "expected an ONNX model with one input and one output")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelError(path, f"expected an (n, c, y, x) input, found {len(dims)} dimensions")
    channel_dim = dims[1].dim_value if dims[1].HasField("dim_value") else 0
    in_channels = int(channel_dim) if channel_dim > 0 else default_channels
    modality = default_modality or ("brightfield" if in_channels == 3 else "fluorescence")
    values: dict[str, Any] = {
        "name": path.stem,
        "file": path.name,
        "modality": modality,
        "channels": ["R", "G", "B"] if in_channels == 3 else [f"C{i}" for i in range(in_channels)],
        "in_channels": in_channels,
        # Unknown: the U-Nets here need multiples of 16; padding more is harmless.
        "size_multiple": 16,
        "input_name": inputs[0].name,
        "output_name": graph.output[0].name,
    }
    for prop in model.metadata_props:
        try:
            values[prop.key] = json.loads(prop.value)
        except ValueError:
            values[prop.key] = prop.value
    values["input_name"], values["output_name"] = inputs[0].name, graph.output[0].name
    return values


def resolve_model(
    name_or_path: str | Path | None,
    slide: Slide,
    *,
    strict: bool = False,
    provider: str | None = None,
) -> ResolvedModel:
    """Find the model to run on a slide and check that it fits.

    Parameters
    ----------
    name_or_path : str or Path or None
        A shipped model's name, a path to an ``.onnx`` file, or ``None`` for the shipped
        model that fits the slide's modality.
    slide : Slide
        The slide it will run on.
    strict : bool
        Turn a pixel size outside the card's ``mpp_range`` into an error.
    provider : str, optional
        The ONNX Runtime execution provider the model will run on. Without a model name,
        it picks among the shipped variants of a model (:func:`default_precision`): the
        int8 variant on the CPU where its card shows it within
        0.01 SSIM of the full model (:func:`int8_fits_default`), full precision otherwise,
        elsewhere and when not given.

    Returns
    -------
    ResolvedModel

    Raises
    ------
    ModelError
        Unknown name, unreadable file, checksum mismatch, channels that do not fit.
    OptionError
        ``strict`` and the slide's mpp lies outside the card's range, or the card's
        modality is not the slide's (a warning without ``strict``).
    """
    card, path = _find(name_or_path, slide, provider=provider)
    sha = file_sha256(path)
    if card.sha256 and card.sha256 != sha:
        raise ModelError(path, "SHA-256 does not match its model card (corrupt or replaced)")
    if card.in_channels not in (1, slide.n_channels):
        raise ModelError(
            path,
            f"the model takes {card.in_channels} channels but the slide has {slide.n_channels}",
        )
    if card.in_channels == 1 and slide.n_channels > 1:
        LOG.info(
            "model %s has one channel: running the %d channels one by one",
            card.name,
            slide.n_channels,
        )
    _check_mpp(card, slide, path, strict=strict)
    _check_modality(card, slide, strict=strict)
    return ResolvedModel(card=card, path=path, sha256=sha)


def _check_modality(card: ModelCard, slide: Slide, *, strict: bool) -> None:
    """Warn (or refuse with ``strict``) when the card's modality is not the slide's.

    As in :func:`_check_mpp`, a slide without a finite pixel size is a placeholder (the
    evaluation's in-memory fields) whose modality means nothing.
    """
    if card.modality == slide.modality or not math.isfinite(slide.mpp):
        return
    message = (
        f"the model {card.name} is for {card.modality} slides; this slide looks {slide.modality}"
    )
    if strict:
        raise OptionError(str(slide.path), message, hint="drop --strict to run anyway")
    LOG.warning("%s: %s", slide.path, message)


def precision_of(card: ModelCard) -> str:
    """``"int8"`` for a quantised variant, else ``"fp32"`` (a trained model)."""
    return str(card.variant.get("precision", "fp32"))


def default_precision(provider: str | None) -> str:
    """The precision of the shipped variant a run on ``provider`` gets by default.

    On the CPU the static int8 variant (about 1.5x faster on AVX2), where its card shows it
    close enough to the full model (:func:`int8_fits_default`); on GPU providers, and when
    the provider is not known, the full-precision model (CUDA runs QDQ int8 graphs no
    faster, TensorRT builds its own fp16 engine from it).
    """
    from wsi_deepr.inference import CPU

    return "int8" if provider == CPU else "fp32"


def variant_ssim_disagreement(card: ModelCard, full: ModelCard | None = None) -> float | None:
    """Largest SSIM difference between a variant's output and its full model's, any defocus.

    From the check ``wsi-deepr quantize`` records in the card (``validation.vs_full``: one
    row per defocus, each with a finite ``ssim_delta``). ``None`` (unchecked) when the card
    records no such check, a row lacks a finite ``ssim_delta``, or ``full`` (the variant's
    full model, where known) is not the model the check was made against (its sha256).
    """
    if full is not None and full.sha256 != card.variant.get("of_sha256"):
        return None
    rows = card.validation.get("vs_full") if isinstance(card.validation, dict) else None
    if not isinstance(rows, list) or not rows:
        return None
    deltas = [r.get("ssim_delta") if isinstance(r, dict) else None for r in rows]
    if not all(isinstance(d, int | float) and math.isfinite(d) for d in deltas):
        return None
    return max(abs(float(d)) for d in deltas)  # type: ignore[arg-type]


def int8_fits_default(card: ModelCard, full: ModelCard | None = None) -> bool:
    """Whether an int8 variant may be the CPU default: a recorded check within
    :data:`wsi_deepr.evaluation_summary.VARIANT_SLACK` of its full model at every defocus."""
    disagreement = variant_ssim_disagreement(card, full)
    return disagreement is not None and disagreement <= VARIANT_SLACK


def _find(
    name_or_path: str | Path | None, slide: Slide, *, provider: str | None = None
) -> tuple[ModelCard, Path]:
    shipped = shipped_cards()
    if name_or_path is None:
        fitting = [(c, p) for c, p in shipped.values() if c.modality == slide.modality]
        wanted = default_precision(provider)

        def full_of(card: ModelCard) -> ModelCard | None:
            return shipped.get(str(card.variant.get("of")), (None,))[0]

        def unfit(card: ModelCard) -> bool:  # an int8 variant too far from its full model
            return precision_of(card) == "int8" and not int8_fits_default(card, full_of(card))

        if wanted == "int8":
            for card in (c for c, _ in fitting if unfit(c)):
                disagreement = variant_ssim_disagreement(card, full_of(card))
                LOG.info(
                    "model %s: not the default, its output differs from its full model's "
                    "by %s SSIM (limit %g; unchecked: no check recorded for this full model)",
                    card.name,
                    "an unchecked" if disagreement is None else f"{disagreement:.4f}",
                    VARIANT_SLACK,
                )
        fitting.sort(
            key=lambda cp: (
                cp[0].in_channels != slide.n_channels,
                unfit(cp[0]),  # last, yet still a model where nothing else is shipped
                precision_of(cp[0]) != wanted,
                precision_of(cp[0]) != "fp32",  # else full precision before other variants
                cp[0].name,
            )
        )
        if not fitting:
            raise ModelError(
                models_dir(),
                f"no shipped model for {slide.modality} slides",
                hint="pass --model PATH.onnx",
            )
        card, path = fitting[0]
        LOG.info(
            "model %s: the shipped %s model (%d channel%s, %s) for this %s slide",
            card.name, card.modality, card.in_channels,
            "" if card.in_channels == 1 else "s", precision_of(card), slide.modality,
        )  # fmt: skip
        return card, path
    text = str(name_or_path)
    if text in shipped:
        return shipped[text]
    path = Path(text).expanduser()
    if path.suffix.lower() == ".onnx" or path.exists():
        if not path.is_file():
            raise ModelError(path, "no such model file")
        values, source = card_values(
            path, default_channels=slide.n_channels, default_modality=slide.modality
        )
        return ModelCard.from_dict(values, source=source), path
    names = ", ".join(sorted(shipped)) or "none shipped"
    raise ModelError(text, f"unknown model (available: {names})", hint="or give a path.onnx")


def _check_mpp(card: ModelCard, slide: Slide, path: Path, *, strict: bool) -> None:
    if card.mpp_range is None:
        return
    lo, hi = card.mpp_range
    if lo <= slide.mpp <= hi or not math.isfinite(slide.mpp):
        return
    message = (
        f"slide pixel size {slide.mpp:g} um/px is outside the model's range "
        f"{lo:g}-{hi:g} um/px ({card.name})"
    )
    if strict:
        raise OptionError(str(slide.path), message, hint="drop --strict to run anyway")
    LOG.warning("%s: %s", slide.path, message)
