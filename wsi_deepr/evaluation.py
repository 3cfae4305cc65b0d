"""Quality of a Deep-R model against ground truth: quality vs defocus, baselines, tilt.

Evaluation uses only held-out fields of view (sources whose split is ``"test"``, see
:func:`wsi_deepr.pairs.split_of`). Defocused inputs are simulated from them with
:mod:`wsi_deepr.physics` at fixed, stated settings (no random draws beyond the noise
seed): blur in linear intensity, Poisson-Gaussian noise, and for brightfield sRGB encoding
and JPEG compression, as the training simulation does. Metrics compare display values in
[0, 1] (``data_range = 1``).

A model runs on a whole image by tiles through :func:`wsi_deepr.refocus.refocus_array`
and :class:`wsi_deepr.inference.Predictor` (the same path as ``wsi-deepr run``),
normalised with the input image's own per-channel mean and standard deviation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_deepr import deconvolution, metrics, pairs, physics
from wsi_deepr.errors import InputError, ModelError
from wsi_deepr.local_dask import SYNC

LOG = logging.getLogger("wsi_deepr")

F32 = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ModelUnderTest:
    """A resolved model, ready to refocus in-memory images."""

    name: str
    """Card name."""
    path: Path
    """The ONNX file."""
    sha256: str
    """SHA-256 of the file."""
    card: Any
    """The :class:`wsi_deepr.model_registry.ModelCard`."""
    predictor: Any
    """The :class:`wsi_deepr.inference.Predictor`."""
    tile_px: int = 512
    """Tile edge for images larger than one tile."""
    overlap_px: int = 64
    """Tile overlap."""

    @property
    def modality(self) -> str:
        """``"brightfield"`` or ``"fluorescence"``."""
        return str(self.card.modality)

    @property
    def defocus_range_um(self) -> tuple[float, float]:
        """The card's training range (``(-5, 5)`` when the card does not say)."""
        rng = self.card.defocus_range_um
        return (float(rng[0]), float(rng[1])) if rng else (-5.0, 5.0)

    def refocus(self, image: F32) -> F32:
        """Run the model on a ``(C, Y, X)`` float image by tiles; same shape out."""
        import dask.array as da

        from wsi_deepr.refocus import refocus_array
        from wsi_deepr.tiling import TileGrid, plan_tiles

        # float64 in: the tiles are cast (copied) to float32 on their way to the model, so
        # nothing downstream can write into the caller's image through a view.
        arr = np.ascontiguousarray(image, dtype=np.float64)
        mean = arr.mean(axis=(1, 2))
        std = np.maximum(arr.std(axis=(1, 2)), 1e-6)
        grid = TileGrid(self.tile_px, self.overlap_px)
        plan = plan_tiles(arr.shape[1:], grid)
        data = da.from_array(arr, chunks=arr.shape)
        lazy = refocus_array(data, plan, self.predictor, mean=mean, std=std)
        return np.asarray(lazy.compute(scheduler=SYNC), dtype=np.float32)


def load_model(
    name_or_path: str | Path, *, device: str = "cpu", threads: int = 2
) -> ModelUnderTest:
    """Resolve a shipped model name or an ``.onnx`` path and prepare its predictor.

    Parameters
    ----------
    name_or_path : str or Path
        As ``wsi-deepr run --model``.
    device : {"auto", "cpu", "cuda", "tensorrt"}
        Execution device.
    threads : int
        ONNX Runtime intra-op threads.

    Returns
    -------
    ModelUnderTest

    Raises
    ------
    ModelError
        Unknown model or unreadable file.
    """
    import dask.array as da

    from wsi_deepr.inference import Predictor, select_provider
    from wsi_deepr.model_registry import resolve_model
    from wsi_deepr.slide import Slide

    # resolve_model checks a model against a slide; a three-channel placeholder stands in
    # for the in-memory fields evaluated here (it accepts 1- and 3-channel models).
    placeholder = da.zeros((3, 1, 1), dtype=np.float32)
    probe = Slide(
        "<evaluation>", placeholder, math.nan, ("R", "G", "B"), ("FF0000", "00FF00", "0000FF"),
        "brightfield", placeholder, 1.0, "memory",
    )  # fmt: skip
    quiet = LOG.level
    LOG.setLevel(max(quiet, logging.WARNING))  # its "channels one by one" note is moot here
    try:
        resolved = resolve_model(name_or_path, probe)
    finally:
        LOG.setLevel(quiet)
    card = resolved.card
    provider = select_provider(device)
    predictor = Predictor.for_model(resolved, provider=provider, threads=threads)
    return ModelUnderTest(card.name, resolved.path, resolved.sha256, card, predictor)


@dataclass(frozen=True, slots=True)
class EvalSettings:
    """Fixed simulation settings of an evaluation (stated in the report)."""

    modality: str
    """``"brightfield"`` or ``"fluorescence"``."""
    na: float
    """Objective NA."""
    mpp: float
    """Pixel size of the simulated fields."""
    defocus_um: tuple[float, ...]
    """Defocus distances evaluated."""
    crop_px: int = 256
    """Edge of each field of view."""
    n_fovs: int = 20
    """Fields of view (held-out sources) at most."""
    emission_um: float = 0.55
    """Fluorescence emission wavelength."""
    photons_at_one: float = 1000.0
    """Photo-electrons at intensity 1."""
    read_noise_e: float = 2.0
    """Camera read noise."""
    jpeg_quality: int = 90
    """Brightfield JPEG quality."""
    spherical_waves: float = 0.0
    """Primary spherical aberration."""
    seed: int = 0
    """Noise seed."""
    condenser_na: float | None = None
    """Brightfield Köhler condenser NA (partially coherent model); ``None``: incoherent."""

    def optics(self) -> tuple[physics.Optics, ...]:
        """Optics of each channel."""
        if self.modality == "brightfield":
            return physics.brightfield_optics(
                self.na,
                self.mpp,
                spherical_waves=self.spherical_waves,
                condenser_na=self.condenser_na,
            )
        return (physics.Optics(self.na, self.emission_um, self.mpp, 1.0, self.spherical_waves),)


def settings_for(
    model: ModelUnderTest,
    *,
    quick: bool = False,
    z_max_um: float | None = None,
    **overrides: Any,
) -> EvalSettings:
    """Evaluation settings from a model card: z = 0, +/-1, +/-2 ... up to its range.

    Uses the card's NA (0.75 brightfield / 0.95 fluorescence if absent) and the middle of
    its mpp range (``mpp=`` overrides it); brightfield is imaged under Köhler illumination
    with a typical condenser (:func:`wsi_deepr.physics.typical_condenser_na`, 0.5 at NA
    0.75; pass
    ``condenser_na=None`` for the incoherent model). ``quick`` keeps every other integer
    z, 2 fields and 192 px crops.
    ``z_max_um`` widens the z range to +/- that (models trained on a shorter range are
    then also seen beyond it, as in the paper's Fig. 8).
    """
    card = model.card
    na = float(card.objective_na or (0.75 if model.modality == "brightfield" else 0.95))
    lo, hi = card.mpp_range or ((0.25, 0.5) if model.modality == "brightfield" else (0.15, 0.3))
    z_lo, z_hi = model.defocus_range_um
    if z_max_um is not None:
        z_lo, z_hi = min(z_lo, -abs(z_max_um)), max(z_hi, abs(z_max_um))
    zs = [float(z) for z in range(math.ceil(z_lo), math.floor(z_hi) + 1)]
    values: dict[str, Any] = {"n_fovs": 20, "crop_px": 256}
    if quick:
        zs = [z for z in zs if z % 2 == 0]
        values = {"n_fovs": 2, "crop_px": 192}
    if model.modality == "brightfield":  # Köhler illumination, as a scanner images H&E
        values["condenser_na"] = physics.typical_condenser_na(na)
    values.update(overrides)
    mpp = values.pop("mpp", None) or round(0.5 * (lo + hi), 4)
    return EvalSettings(model.modality, na, float(mpp), tuple(zs), **values)


def held_out_fields(data_dir: Path, settings: EvalSettings) -> list[tuple[str, F32]]:
    """Centre crops of held-out (``"test"`` split) sources, display values ``(C, Y, X)``.

    Returns
    -------
    list of (str, ndarray)
        Source file name and in-focus crop, at most ``settings.n_fovs``.
    """
    sources = [
        s for s in pairs.list_sources(data_dir, settings.modality) if pairs.split_of(s) == "test"
    ]
    fields: list[tuple[str, F32]] = []
    for source in sources:
        image = pairs.load_in_focus(source, settings.modality)
        _, h, w = image.shape
        if min(h, w) < settings.crop_px:
            continue
        y0, x0 = (h - settings.crop_px) // 2, (w - settings.crop_px) // 2
        crop = image[:, y0 : y0 + settings.crop_px, x0 : x0 + settings.crop_px]
        if float(crop.std()) < 0.02:  # blank background says nothing about focus
            continue
        fields.append((Path(source.path).name, np.ascontiguousarray(crop)))
        if len(fields) == settings.n_fovs:
            break
    if not fields:
        raise InputError(
            data_dir, f"no held-out {settings.modality} fields of {settings.crop_px} px"
        )
    return fields


def to_linear(display: F32, modality: str) -> F32:
    """Display values to linear intensity (sRGB decoded for brightfield)."""
    return (
        pairs.srgb_to_linear(display)
        if modality == "brightfield"
        else np.asarray(display, np.float32)
    )


def to_display(linear: F32, modality: str) -> F32:
    """Linear intensity to display values in [0, 1]."""
    if modality == "brightfield":
        return pairs.linear_to_srgb(linear)
    return np.clip(linear, 0.0, 1.0).astype(np.float32)


def simulate_input(
    target: F32, defocus_um: float | NDArray[np.floating], settings: EvalSettings, *, seed: int
) -> F32:
    """The defocused capture of an in-focus field (display values, same shape).

    The field is reflect-padded by the PSF radius first, so the blur at its border comes
    from (mirrored) sample rather than from zeros.
    """
    optics = settings.optics()
    z_max = float(np.max(np.abs(defocus_um)))
    margin = max(physics.psf(o, z_max).shape[0] for o in optics) // 2 + 2
    linear = np.pad(
        to_linear(target, settings.modality),
        ((0, 0), (margin, margin), (margin, margin)),
        mode="reflect",
    )
    if np.ndim(defocus_um):
        defocus_um = np.pad(np.asarray(defocus_um, dtype=np.float64), margin, mode="edge")
    blurred = physics.defocus_image(linear, defocus_um, optics=optics)
    rng = np.random.default_rng(seed)
    noisy = physics.add_poisson_gaussian_noise(
        blurred, photons_at_one=settings.photons_at_one, read_noise_e=settings.read_noise_e, rng=rng
    )[:, margin:-margin, margin:-margin]
    display = to_display(noisy, settings.modality)
    if settings.modality == "brightfield":
        display = physics.jpeg_roundtrip(display, quality=settings.jpeg_quality)
    return display


def capture_seed(settings: EvalSettings, field_index: int, defocus_index: int) -> int:
    """Noise seed of the capture of field ``field_index`` at ``settings.defocus_um[j]``."""
    return settings.seed + 1000 * field_index + defocus_index


def quality(image: F32, reference: F32) -> dict[str, float]:
    """SSIM, MS-SSIM, RMSE and PSNR of a display image against its reference."""
    out = {
        "ssim": metrics.ssim(image, reference, data_range=1.0),
        "rmse": metrics.rmse(image, reference),
        "psnr": metrics.psnr(image, reference, data_range=1.0),
    }
    try:
        out["ms_ssim"] = metrics.ms_ssim(image, reference, data_range=1.0)
    except ValueError:  # too small for five scales
        out["ms_ssim"] = math.nan
    return out


def deconvolve(capture: F32, defocus_um: float, settings: EvalSettings, method: str) -> F32:
    """RL or Landweber of a capture given the true PSF at its defocus (display values)."""
    psfs = [physics.psf(o, defocus_um) for o in settings.optics()]
    linear = to_linear(capture, settings.modality)
    if method == "rl":
        restored = deconvolution.richardson_lucy(linear, psfs)
    elif method == "landweber":
        restored = deconvolution.landweber(linear, psfs)
    else:
        raise ValueError(f"unknown deconvolution {method!r}")
    return to_display(restored, settings.modality)


def quality_vs_defocus(
    model: ModelUnderTest,
    fields: list[tuple[str, F32]],
    settings: EvalSettings,
    *,
    deconvolution_z_um: Iterable[float] = (),
    deconvolution_fovs: int = 3,
) -> list[dict[str, Any]]:
    """Metrics of input and output (and deconvolutions) for every field and defocus.

    Parameters
    ----------
    model : ModelUnderTest
        The model.
    fields : list of (str, ndarray of shape (C, Y, X))
        Held-out in-focus fields (:func:`held_out_fields`).
    settings : EvalSettings
        Simulation settings; ``settings.defocus_um`` are the distances.
    deconvolution_z_um : iterable of float
        Distances at which RL and Landweber also run (on the first fields only).
    deconvolution_fovs : int
        How many fields get the deconvolution baselines.

    Returns
    -------
    list of dict
        One row per (field, z, method): ``fov``, ``defocus_um``, ``method`` (``input``,
        ``deepr``, ``rl``, ``landweber``), ``ssim``, ``ms_ssim``, ``rmse``, ``psnr``;
        input and Deep-R rows also in a ``_crop10`` variant (10-px border cropped) where
        the baselines run, so all four compare on the same pixels.
    """
    deconv_z = {round(float(z), 3) for z in deconvolution_z_um}
    rows: list[dict[str, Any]] = []
    crop = deconvolution.crop_border
    for k, (name, target) in enumerate(fields):
        for j, z in enumerate(settings.defocus_um):
            capture = simulate_input(target, z, settings, seed=capture_seed(settings, k, j))
            output = np.clip(model.refocus(capture), 0.0, 1.0)
            results = {"input": capture, "deepr": output}
            for method, image in results.items():
                rows.append(
                    {"fov": name, "defocus_um": z, "method": method, **quality(image, target)}
                )
            if round(z, 3) in deconv_z and k < deconvolution_fovs:
                t0 = time.perf_counter()
                for method in ("rl", "landweber"):
                    results[method] = deconvolve(capture, z, settings, method)
                LOG.info("deconvolution of %s at %+g um: %.1f s", name, z, time.perf_counter() - t0)
                for method, image in results.items():
                    rows.append(
                        {
                            "fov": name,
                            "defocus_um": z,
                            "method": f"{method}_crop10",
                            **quality(crop(image), crop(target)),
                        }
                    )
        LOG.info("%s: field %d/%d (%s) done", model.name, k + 1, len(fields), name)
    return rows


def summarise(
    rows: list[dict[str, Any]], *, keys: tuple[str, ...] = ("method", "defocus_um")
) -> list[dict[str, Any]]:
    """Mean and standard deviation over fields of every metric, per method and z."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key in sorted(groups, key=lambda t: tuple(str(v) if isinstance(v, str) else v for v in t)):
        members = groups[key]
        summary: dict[str, Any] = dict(zip(keys, key, strict=True))
        summary["n"] = len(members)
        for metric in ("ssim", "ms_ssim", "rmse", "psnr"):
            values = np.array([m[metric] for m in members if metric in m], dtype=np.float64)
            values = values[np.isfinite(values)]
            summary[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            summary[f"{metric}_std"] = float(values.std()) if values.size else math.nan
        out.append(summary)
    return out


def tilted_sample(
    model: ModelUnderTest,
    fields: list[tuple[str, F32]],
    settings: EvalSettings,
    *,
    span_um: float = 4.356,
    center_defocus_um: tuple[float, ...] = (0.0, -2.2),
) -> list[dict[str, Any]]:
    """Row sharpness (eqs. 5-7) of a tilted capture and its Deep-R output.

    The sample plane is tilted along y so that defocus changes by ``span_um`` across the
    field (the paper's 1.5 degrees over a 20x field give 4.356 um). The reference is the
    in-focus field itself (the paper, without ground truth, used a maximum projection).

    Returns
    -------
    list of dict
        Per field and centre defocus: ``tilt_deg``, mean row coefficient and its mean
        standard deviation for input and output, and the per-row curves ``alpha_input``,
        ``alpha_output``, ``std_input``, ``std_output`` and ``defocus_row_um`` (lists).
    """
    if model.modality != settings.modality:
        raise ModelError(model.path, "model and settings differ in modality")
    rows = []
    for k, (name, target) in enumerate(fields):
        h, w = target.shape[1:]
        tilt_deg = math.degrees(math.atan(span_um / (h * settings.mpp)))
        for centre in center_defocus_um:
            depth = physics.tilt_defocus_map(
                (h, w), mpp=settings.mpp, tilt_deg=tilt_deg, center_defocus_um=centre
            )
            capture = simulate_input(target, depth, settings, seed=settings.seed + 7 * k)
            output = np.clip(model.refocus(capture), 0.0, 1.0)
            a_in = metrics.row_sharpness(capture, target)
            a_out = metrics.row_sharpness(output, target)
            rows.append(
                {
                    "fov": name,
                    "center_defocus_um": centre,
                    "tilt_deg": tilt_deg,
                    "span_um": span_um,
                    "alpha_input_mean": float(a_in.alpha.mean()),
                    "alpha_output_mean": float(a_out.alpha.mean()),
                    "std_input_mean": float(a_in.std.mean()),
                    "std_output_mean": float(a_out.std.mean()),
                    "ssim_input": metrics.ssim(capture, target, data_range=1.0),
                    "ssim_output": metrics.ssim(output, target, data_range=1.0),
                    "defocus_row_um": depth[:, 0].tolist(),
                    "alpha_input": a_in.alpha.tolist(),
                    "alpha_output": a_out.alpha.tolist(),
                    "std_input": a_in.std.tolist(),
                    "std_output": a_out.std.tolist(),
                }
            )
    return rows
