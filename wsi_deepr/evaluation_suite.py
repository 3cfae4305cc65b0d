"""The whole evaluation of one or more models: the six parts of the paper's figures.

:func:`evaluate_models` runs, per model: quality vs defocus with the deconvolution
baselines (Fig. 2b, 6, 8), the tilted sample (Fig. 4), the bead PSF analysis on the real
bead stacks (Fig. 5b, fluorescence models), the online-autofocus baseline against Deep-R's
measured speed (Table 1), and a real z-stack when one is given. It returns plain,
JSON-ready results that :mod:`wsi_deepr.report_html` turns into a report folder.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_deepr import autofocus, beads, evaluation, metrics
from wsi_deepr.errors import InputError
from wsi_deepr.evaluation import EvalSettings, ModelUnderTest

LOG = logging.getLogger("wsi_deepr")

BEAD_STACKS: dict[str, tuple[str, float | None, float | None, int]] = {
    "bian_bead_image1_crop": ("beads/bian_bead_image1_crop.tif", 0.125, 0.022, 40),
    "flowdec_bead_25pct": ("beads/flowdec_bead_25pct/data.tif", None, None, 30),
}
"""Real bead stacks: file under the data folder, z step (um; ``None``: unknown, z in planes),
lateral pixel size (um) or ``None`` when the source does not state it, and the crop edge
(the paper's 30 px; 40 px where beads are 14 px wide at 0.022 um/px)."""


@dataclass(frozen=True, slots=True)
class SuiteOptions:
    """What to run and how much of it."""

    quick: bool = False
    """Small fields, few z and fields: for tests and smoke runs."""
    autofocus_fovs: int = 4
    """Fields of view of the autofocus benchmark (paper: 4)."""
    autofocus_starts: int = 4
    """Random starting heights per field (paper: 4)."""
    timing: autofocus.ScanTiming = field(default_factory=autofocus.ScanTiming)
    """Exposure, stage move and field of view of the autofocus benchmark."""
    speed_px: int = 1024
    """Edge of the image timed for Deep-R's seconds per mm^2."""
    seed: int = 0
    """Seed of the starting heights."""
    n_fovs: int | None = None
    """Held-out fields per model (default 20, quick 2)."""
    mpp: float | None = None
    """Pixel size the held-out fields are imaged at (default: the middle of each card's
    range)."""


def _stack_planes(stack: NDArray[Any], model: ModelUnderTest) -> NDArray[np.float32]:
    """Deep-R output of every plane of a ``(Z, Y, X)`` stack in [0, 1]."""
    return np.stack([model.refocus(p[None])[0] for p in stack]).astype(np.float32)


def _normalise_stack(stack: NDArray[Any]) -> NDArray[np.float32]:
    arr = np.asarray(stack, dtype=np.float32)
    lo, hi = np.percentile(arr, [0.1, 99.99])
    return np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0.0, 1.5).astype(np.float32)


def bead_analysis(
    model: ModelUnderTest | None, data_dir: Path, *, quick: bool = False
) -> list[dict[str, Any]]:
    """Lateral FWHM vs z on the real bead stacks, input and (if given) model output.

    Returns one entry per stack found: z, FWHM mean/std per stack kind, bead counts.
    ``quick`` takes the first stack only, every other plane.
    """
    import tifffile

    results = []
    for name, (rel, stated_step_um, mpp, crop_px) in BEAD_STACKS.items():
        z_step_um = 1.0 if stated_step_um is None else stated_step_um
        path = data_dir / rel
        if not path.is_file():
            LOG.warning("bead stack %s not found; skipped", path)
            continue
        stack = _normalise_stack(tifffile.imread(path))
        if quick:
            stack, z_step_um = stack[::2], 2 * z_step_um
        stacks: dict[str, NDArray[Any]] = {"input": stack}
        if model is not None:
            stacks["output"] = _stack_planes(stack, model)
        analysis = beads.analyse_beads(stacks, z_step_um=z_step_um, crop_px=crop_px)
        entry: dict[str, Any] = {
            "stack": name,
            "z_step_um": z_step_um,
            "mpp": mpp,
            "crop_px": crop_px,
            "z_unit": "planes" if stated_step_um is None else "um",
            "z": analysis.z_um.tolist(),
            "focus_index": analysis.focus_index,
            "beads_isolated": len(analysis.beads),
            "beads_kept": int(analysis.kept.sum()),
        }
        for kind in stacks:
            mean, std = analysis.mean_std(kind)
            entry[f"fwhm_{kind}_mean_px"] = mean.tolist()
            entry[f"fwhm_{kind}_std_px"] = std.tolist()
        results.append(entry)
        if quick:
            break
    return results


def deepr_speed(model: ModelUnderTest, settings: EvalSettings, *, edge_px: int) -> dict[str, Any]:
    """Deep-R's measured seconds per mm^2 on this machine (after a warm-up run).

    Wall-clock seconds depend on what else the machine runs, so the process CPU seconds
    of the timed run and the 1-minute load average are recorded beside them.
    """
    rng = np.random.default_rng(0)
    channels = 3 if settings.modality == "brightfield" else 1
    image = rng.random((channels, edge_px, edge_px), dtype=np.float32)
    # Session start-up and the first run at this shape (ONNX Runtime plans and allocates
    # per input shape: a first 1024 px run takes ~1.5x a later one) are not model time.
    model.refocus(image)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.refocus(image)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    area_mm2 = edge_px * edge_px * (settings.mpp * 1e-3) ** 2
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_average_1min": os.getloadavg()[0],
        "threads": model.predictor.threads,
        "edge_px": edge_px,
        "mpp": settings.mpp,
        "area_mm2": area_mm2,
        "s_per_mm2": seconds / area_mm2,
        "provider": str(model.predictor.provider),
    }


def autofocus_benchmark(
    fields: list[tuple[str, NDArray[np.float32]]],
    settings: EvalSettings,
    options: SuiteOptions,
) -> list[dict[str, Any]]:
    """Brent autofocus with each criterion on simulated stacks of held-out fields.

    Each field sits at a true focus of 0 um; the search starts at heights drawn uniformly
    in +/- 3 um (so the focus lies inside the 10 um interval). Returns one row per search.
    """
    rng = np.random.default_rng(options.seed)
    timing = replace(options.timing, mpp=settings.mpp)
    optics = settings.optics()
    dof_um = float(np.mean([o.depth_of_field_um for o in optics]))
    pixel_ratio = timing.fov_px[0] * timing.fov_px[1] / float(settings.crop_px**2)
    rows = []
    starts = rng.uniform(-3.0, 3.0, size=(len(fields), options.autofocus_starts))
    for k, (name, target) in enumerate(fields[: options.autofocus_fovs]):
        linear = evaluation.to_linear(target, settings.modality)
        for start in starts[k]:
            for criterion, function in metrics.FOCUS_CRITERIA.items():
                scope = autofocus.SimulatedStack(
                    linear, optics, photons_at_one=settings.photons_at_one, seed=k
                )
                result = autofocus.brent_autofocus(
                    scope, function, start_um=float(start), name=criterion
                )
                # The criterion cost scales with pixels: from the simulated field to the camera's.
                seconds = timing.autofocus_s(result.images, result.compute_s * pixel_ratio)
                rows.append(
                    {
                        "fov": name,
                        "criterion": criterion,
                        "start_um": result.start_um,
                        "found_um": result.found_um,
                        "error_um": result.found_um,
                        "found_focus": autofocus.focus_found(
                            result.found_um, 0.0, depth_of_field_um=dof_um
                        ),
                        "images": result.images,
                        "seconds_per_fov": seconds,
                        "s_per_mm2": timing.s_per_mm2(seconds),
                    }
                )
    return rows


def autofocus_real_stack(data_dir: Path, options: SuiteOptions) -> list[dict[str, Any]]:
    """Brent autofocus on the real bead stack with a stated z step (interpolated planes).

    The true focus is the plane of largest standard deviation (the paper's "most focused
    plane"); searches start within +/- 1.5 um of it (the stack spans 5 um, heights
    beyond it give its end planes). A search finds focus when it lands within two planes.
    No seconds per mm^2: the stack's field of view is a crop.
    """
    import tifffile

    rel, z_step_um, _, _ = BEAD_STACKS["bian_bead_image1_crop"]
    path = data_dir / rel
    if not path.is_file() or z_step_um is None:
        return []
    planes = np.asarray(tifffile.imread(path), dtype=np.float64)
    true_um = beads.focused_plane(planes) * z_step_um
    rng = np.random.default_rng(options.seed + 1)
    rows = []
    for start in true_um + rng.uniform(-1.5, 1.5, size=options.autofocus_starts):
        for criterion, function in metrics.FOCUS_CRITERIA.items():
            stack = autofocus.ZStack(planes, z_step_um=z_step_um)
            result = autofocus.brent_autofocus(stack, function, start_um=start, name=criterion)
            error = result.found_um - true_um
            rows.append(
                {
                    "fov": path.stem,
                    "criterion": criterion,
                    "start_um": result.start_um,
                    "found_um": result.found_um,
                    "error_um": error,
                    "found_focus": abs(error) <= 2 * z_step_um,
                    "images": result.images,
                    "seconds_per_fov": math.nan,
                    "s_per_mm2": math.nan,
                }
            )
    return rows


def zstack_quality(model: ModelUnderTest, path: Path, *, z_step_um: float) -> list[dict[str, Any]]:
    """Input and output quality on a real z-stack against the paper's ground-truth plane.

    The ground truth is the plane with the highest SSIM to an extended-depth-of-field
    image (per pixel, the plane of largest local contrast).
    """
    import tifffile
    from scipy import ndimage as ndi

    try:
        stack = np.asarray(tifffile.imread(path))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the z-stack: {exc}") from exc
    if stack.ndim == 3:
        stack = stack[:, None]
    if stack.ndim != 4 or stack.shape[0] < 2:
        raise InputError(path, f"expected a (z, y, x) or (z, c, y, x) stack, got {stack.shape}")
    if stack.shape[-1] in (3, 4) and stack.shape[1] not in (1, 3):
        stack = np.moveaxis(stack[..., :3], -1, 1)
    planes = _normalise_stack(stack)
    grey = planes.mean(axis=1)
    contrast = np.stack([ndi.gaussian_filter(ndi.laplace(g) ** 2, 3) for g in grey])
    best = contrast.argmax(axis=0)
    edof = np.take_along_axis(planes, best[None, None], axis=0)[0]
    ssims = [metrics.ssim(p, edof, data_range=1.0) for p in planes]
    k_gt = int(np.argmax(ssims))
    truth = planes[k_gt]
    rows = []
    for k, plane in enumerate(planes):
        output = np.clip(model.refocus(plane), 0.0, 1.0)
        for method, image in (("input", plane), ("deepr", output)):
            rows.append(
                {
                    "fov": path.name,
                    "defocus_um": round((k - k_gt) * z_step_um, 4),
                    "method": method,
                    **evaluation.quality(np.clip(image, 0, 1), np.clip(truth, 0, 1)),
                }
            )
    return rows


def evaluate_models(
    models: list[ModelUnderTest],
    data_dir: Path,
    *,
    options: SuiteOptions,
    zstack: Path | None = None,
    zstack_step_um: float = 0.2,
) -> dict[str, Any]:
    """Run every part of the evaluation for each model.

    Parameters
    ----------
    models : list of ModelUnderTest
        Models (see :func:`wsi_deepr.evaluation.load_model`).
    data_dir : Path
        The shared data folder (held-out sources and bead stacks).
    options : SuiteOptions
        Sizes and timings.
    zstack : Path, optional
        A real z-stack TIFF to evaluate on as well.
    zstack_step_um : float
        Its axial spacing.

    Returns
    -------
    dict
        ``{"models": [per-model results], "options": ...}``, JSON-ready.
    """
    results = []
    # The autofocus baselines depend on the modality's fields and defocus range only, not
    # on the model: measured once per modality (the real bead stack once) and shared.
    autofocus_of: dict[str, list[dict[str, Any]]] = {}
    autofocus_real: list[dict[str, Any]] | None = None
    for model in models:
        t0 = time.perf_counter()
        # Every model of a modality is seen over the widest training range among them.
        z_max = max(
            max(abs(v) for v in m.defocus_range_um) for m in models if m.modality == model.modality
        )
        sizes: dict[str, Any] = {} if options.n_fovs is None else {"n_fovs": options.n_fovs}
        if options.mpp is not None:
            sizes["mpp"] = options.mpp
        settings = evaluation.settings_for(model, quick=options.quick, z_max_um=z_max, **sizes)
        fields = evaluation.held_out_fields(data_dir, settings)
        z_hi = max(abs(v) for v in model.defocus_range_um)
        deconv_z = sorted({float(round(s * f * z_hi)) for f in (0.3, 0.6) for s in (-1, 1)})
        if model.card.variant:
            # a quantised copy: judged against its full model, not against deconvolution
            deconv_z = []
        if options.quick:
            deconv_z = [z for z in deconv_z if z in settings.defocus_um][:2]
        LOG.info("%s: %d held-out fields, z = %s", model.name, len(fields), settings.defocus_um)
        rows = evaluation.quality_vs_defocus(
            model,
            fields,
            settings,
            deconvolution_z_um=deconv_z,
            deconvolution_fovs=1 if options.quick else 3,
        )
        tilt = evaluation.tilted_sample(
            model,
            fields[: 1 if options.quick else 4],
            settings,
            center_defocus_um=(0.0,) if options.quick else (0.0, -2.2),
        )
        af_options = options
        if options.quick:
            af_options = replace(options, autofocus_fovs=1, autofocus_starts=1)
        if model.modality not in autofocus_of:
            autofocus_of[model.modality] = autofocus_benchmark(fields, settings, af_options)
        if autofocus_real is None:
            autofocus_real = summarise_autofocus(autofocus_real_stack(data_dir, af_options))
        af_rows = autofocus_of[model.modality]
        speed = deepr_speed(model, settings, edge_px=256 if options.quick else options.speed_px)
        entry: dict[str, Any] = {
            "name": model.name,
            "path": str(model.path),
            "sha256": model.sha256,
            "card": model.card.to_dict(),
            "settings": asdict(settings),
            "fields": [name for name, _ in fields],
            "quality_rows": rows,
            "quality": evaluation.summarise(rows),
            "deconvolution_z_um": deconv_z,
            "tilt": tilt,
            "autofocus_rows": af_rows,
            "autofocus": summarise_autofocus(af_rows),
            "autofocus_real": autofocus_real,
            "deepr_speed": speed,
            "beads": (
                bead_analysis(model, data_dir, quick=options.quick)
                if model.modality == "fluorescence"
                else []
            ),
        }
        if zstack is not None:
            zrows = zstack_quality(model, zstack, z_step_um=zstack_step_um)
            entry["zstack"] = {
                "file": str(zstack),
                "z_step_um": zstack_step_um,
                "quality": evaluation.summarise(zrows),
                "rows": zrows,
            }
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
    return {"models": results, "options": _options_dict(options)}


def summarise_autofocus(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per criterion: mean/std of images, seconds per mm^2, error; share that found focus."""
    out = []
    for criterion in metrics.FOCUS_CRITERIA:
        chosen = [r for r in rows if r["criterion"] == criterion]
        if not chosen:
            continue
        images = np.array([r["images"] for r in chosen], dtype=np.float64)
        s_mm2 = np.array([r["s_per_mm2"] for r in chosen])
        error = np.abs(np.array([r["error_um"] for r in chosen]))
        out.append(
            {
                "criterion": criterion,
                "n": len(chosen),
                "images_mean": float(images.mean()),
                "images_std": float(images.std()),
                "s_per_mm2_mean": float(s_mm2.mean()),
                "s_per_mm2_std": float(s_mm2.std()),
                "abs_error_um_mean": float(error.mean()),
                "abs_error_um_max": float(error.max()),
                "found_focus_fraction": float(np.mean([r["found_focus"] for r in chosen])),
            }
        )
    return out


def _options_dict(options: SuiteOptions) -> dict[str, Any]:
    values = asdict(options)
    values["timing"]["fov_mm2_at_0.325mpp"] = options.timing.fov_mm2
    return values
