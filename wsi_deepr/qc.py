"""Focus QC of a slide: where it is blurred, by how much, and what refocusing did.

The library entry behind ``wsi-deepr qc`` (:func:`qc_slide`) and the hooks that
``wsi-deepr run --qc`` / ``--only-blurred`` call (:class:`RunQc`). The maps are written as
low-resolution OME-Zarr images in a ``focus_qc`` group (:mod:`wsi_deepr.qc_store`; inside
the run's output store, or a store of their own for ``qc``), a heat-map PNG
(:mod:`wsi_deepr.heatmap`) and JSON figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_deepr.defocus_estimate import (
    RESIDUAL_FLAG,
    UNEXPLAINED_DB,
    DefocusMap,
    estimate_defocus,
    reblur_residual,
    region_summary,
)
from wsi_deepr.errors import OptionError, OutputError
from wsi_deepr.focus import DEFAULT_BLUR_STOPS, FocusMap, coarse_of, focus_map, select_tiles
from wsi_deepr.physics import Optics, scanner_optics
from wsi_deepr.qc_store import write_maps
from wsi_deepr.slide import Slide
from wsi_deepr.spectra import SlideSpectra, full_scale_of, scan_slide
from wsi_deepr.tiling import TilePlan

LOG = logging.getLogger("wsi_deepr")

PNG_NAME = "focus_map.png"
JSON_NAME = "focus_qc.json"
DEFAULT_NA = {"brightfield": 0.75, "fluorescence": 0.95}
"""Objective NA assumed when no model card says (the shipped models' objectives)."""
FLUORESCENCE_EMISSION_UM = 0.55
"""Emission wavelength assumed for fluorescence channels."""
MAX_RESIDUAL_CELLS = 400
"""At most this many coarse cells get the re-blur check (an even sample of them)."""


def optics_for(slide: Slide, na: float | None) -> tuple[Optics, ...]:
    """Per-channel optics at the slide's pixel size.

    Brightfield R/G/B under Köhler illumination with a typical condenser (2/3 of the
    objective's NA, :func:`wsi_deepr.physics.scanner_optics`): stained tissue blurs
    with the illumination cone, not with the objective's incoherent PSF, which would put
    the estimate of a Köhler-blurred region at 5 um for a true 8 um. Fluorescence is
    incoherent.
    """
    aperture = float(na or DEFAULT_NA[slide.modality])
    if slide.modality == "brightfield" and slide.n_channels == 3:
        return scanner_optics(aperture, slide.mpp)
    return tuple(
        Optics(aperture, FLUORESCENCE_EMISSION_UM, slide.mpp) for _ in range(slide.n_channels)
    )


@dataclass(slots=True)
class QcResult:
    """Focus and defocus maps of one slide (and of its refocused output, after a run)."""

    slide_path: str
    """The slide."""
    mpp: float
    """Level-0 pixel size."""
    blur_stops: float
    """Blur threshold used (score below ``-blur_stops``)."""
    focus_input: FocusMap
    """Focus map of the input."""
    defocus: DefocusMap | None
    """Defocus estimate of the input (``None`` when not asked for)."""
    seconds: float
    """Time to scan and estimate."""
    focus_output: FocusMap | None = None
    """Focus map of the refocused output (after a run with QC)."""
    residual: np.ndarray | None = None
    """Re-blur residual of the output on the coarse grid (after a run with QC)."""
    residual_ratio: np.ndarray | None = None
    """That residual over the unchanged input's own re-blur residual."""
    refocused_tiles: np.ndarray | None = None
    """``(ny, nx)`` bool tiles that went through the model (after a run)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More figures (tiles selected, output timing)."""

    def blurred(self) -> np.ndarray:
        """Blurred cells of the input's focus map."""
        return self.focus_input.blurred(self.blur_stops)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: focus summary, defocus statistics, blurred regions."""
        blurred = self.blurred()
        out: dict[str, Any] = {
            "slide": self.slide_path,
            "focus": self.focus_input.summary(self.blur_stops),
            "defocus": None,
            "regions": region_summary(blurred, self.focus_input, self.defocus),
            "seconds": self.seconds,
        }
        if self.defocus is not None:
            z = self.defocus.defocus_um
            core = coarse_of(blurred.astype(np.float32))[: z.shape[0], : z.shape[1]] > 0.5
            z_blurred = z[core & np.isfinite(z)]
            rms = self.defocus.fit_rms_db[np.isfinite(self.defocus.fit_rms_db)]
            out["defocus"] = {
                "cell_px": self.defocus.cell_px,
                "reference_cells": self.defocus.reference_cells,
                "blurred_median_um": _median(z_blurred),
                "blurred_p90_um": float(np.percentile(z_blurred, 90)) if z_blurred.size else None,
                "fit_rms_db_median": _median(rms),
                "unexplained_cells": int((rms > UNEXPLAINED_DB).sum()),
                "sign": "|z| only: +z and -z blur alike without spherical aberration",
            }
        if self.focus_output is not None:
            out["focus_output"] = self.focus_output.summary(self.blur_stops)
            before = self.focus_input.score[blurred]
            after = self.focus_output.score[blurred]
            out["blurred_score_before"] = _median(before)
            out["blurred_score_after"] = _median(after)
        if self.residual is not None and self.residual_ratio is not None:
            checked = self.residual[np.isfinite(self.residual)]
            ratio = self.residual_ratio[np.isfinite(self.residual_ratio)]
            out["reblur_residual"] = {
                "cells": int(checked.size),
                "median": _median(checked),
                "ratio_to_unchanged_median": _median(ratio),
                "flagged_cells": int((ratio > RESIDUAL_FLAG).sum()),
                "flag_ratio_above": RESIDUAL_FLAG,
            }
        out.update(self.extra)
        return out

    def one_line(self) -> str:
        """A line for the terminal (one per slide when triaging a batch)."""
        s = self.summary()
        focus, defocus = s["focus"], s["defocus"] or {}
        z = defocus.get("blurred_median_um")
        z_text = f", median defocus {z:.1f} um" if z is not None else ""
        return (
            f"{self.slide_path}: {100 * focus['blurred_fraction']:.1f}% of judged tissue blurred "
            f"({focus['blurred_mm2']:.2f} mm2, {len(s['regions'])} regions{z_text}) "
            f"in {self.seconds:.1f} s"
        )


def assess(
    slide: Slide,
    mask: np.ndarray,
    *,
    na: float | None = None,
    blur_stops: float = DEFAULT_BLUR_STOPS,
    estimate: bool = True,
) -> tuple[QcResult, SlideSpectra]:
    """Scan a slide's level 0 once: focus map and (optionally) defocus estimate.

    Parameters
    ----------
    slide : Slide
        The slide.
    mask : ndarray of bool
        Its tissue mask on the thumbnail grid.
    na : float, optional
        Objective NA for the PSF (default: :data:`DEFAULT_NA` of the modality).
    blur_stops : float
        Blur threshold in stops.
    estimate : bool
        Also estimate the defocus (per-channel spectra and PSF tables: about three
        times the work of the focus map alone).

    Returns
    -------
    QcResult, SlideSpectra
    """
    if not blur_stops > 0:
        raise OptionError("--only-blurred", f"threshold must be > 0 stops, got {blur_stops}")
    started = time.perf_counter()
    spectra = scan_slide(slide, mask, coarse_spectra=estimate)
    fmap = focus_map(spectra)
    dmap = estimate_defocus(spectra, fmap, optics_for(slide, na)) if estimate else None
    seconds = time.perf_counter() - started
    return QcResult(str(slide.path), slide.mpp, blur_stops, fmap, dmap, seconds), spectra


@dataclass(slots=True)
class RunQc:
    """What ``refocus_slide`` keeps between planning and completion for QC."""

    slide: Slide
    """The input."""
    mask: np.ndarray
    """Its tissue mask."""
    na: float | None
    """Objective NA (the model card's)."""
    result: QcResult
    """Input maps."""
    full: bool
    """Defocus estimate, output focus map and re-blur check too (``--qc``)."""

    @classmethod
    def start(
        cls,
        slide: Slide,
        mask: np.ndarray,
        *,
        na: float | None,
        blur_stops: float | None,
        full: bool,
    ) -> RunQc:
        """Assess the input before the run (the focus map; with ``full`` the defocus)."""
        stops = blur_stops or DEFAULT_BLUR_STOPS
        result, _ = assess(slide, mask, na=na, blur_stops=stops, estimate=full)
        return cls(slide, mask, na, result, full)

    def select(self, plan: TilePlan, *, crop: bool = False) -> TilePlan:
        """The plan with only tiles over blurred tissue sent through the model.

        With ``crop``, only the part of each tile holding blurred cells goes through the
        model (:func:`wsi_deepr.focus.model_crops`).
        """
        selected = select_tiles(
            self.result.focus_input, plan, blur_stops=self.result.blur_stops, crop=crop
        )
        tile_h, tile_w = plan.tile_hw
        full_px = selected.n_run * tile_h * tile_w
        cropped = 0
        if selected.crops is not None:
            whole = np.array([0, tile_h, 0, tile_w])
            cropped = int((selected.crops[selected.tissue] != whole).any(axis=1).sum())
        self.result.extra["only_blurred"] = {
            "blur_stops": self.result.blur_stops,
            "tiles_tissue": plan.n_run,
            "tiles_refocused": selected.n_run,
            "tiles_skipped": selected.n_skipped,
            "tiles_cropped": cropped,
            "model_mpx": selected.model_px / 1e6,
            "model_share_of_tiles": selected.model_px / full_px if full_px else 0.0,
        }
        LOG.info("--only-blurred: %d of %d tissue tiles need the model (%.1f Mpx)",
                 selected.n_run, plan.n_run, selected.model_px / 1e6)  # fmt: skip
        return selected

    def finish(self, store: str | Path, plan: TilePlan, *, level0_path: str) -> dict[str, Any]:
        """After the pyramid is written: maps, PNG and summary (output checks if ``full``)."""
        import dask.array as da
        import zarr

        started = time.perf_counter()
        group = zarr.open_group(str(store), mode="r+")
        result = self.result
        result.refocused_tiles = plan.tissue.copy()
        if self.full:
            output = da.from_zarr(group[level0_path])
            spectra_out = scan_slide(self.slide, self.mask, data=output, coarse_spectra=False)
            result.focus_output = focus_map(
                spectra_out, reference_log2=result.focus_input.reference_log2
            )
            result.residual, result.residual_ratio = _residual(self.slide, output, result, self.na)
        write_maps(group, result, plan=plan)
        from wsi_deepr.heatmap import write_png

        png = write_png(self.slide, result, Path(store) / PNG_NAME)
        result.extra["output_qc_seconds"] = time.perf_counter() - started
        summary = result.summary()
        summary["png"] = png.name
        return summary


def _residual(
    slide: Slide, output: Any, result: QcResult, na: float | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Re-blur residual of the blurred coarse cells (an even sample of at most N), and its
    ratio to the residual of the input left unchanged."""
    dmap = result.defocus
    if dmap is None:
        return None, None
    my, mx = dmap.defocus_um.shape
    cells = coarse_of(result.blurred().astype(np.float32))[:my, :mx] > 0.5
    index = np.flatnonzero(cells.ravel())
    if index.size > MAX_RESIDUAL_CELLS:
        keep = index[np.linspace(0, index.size - 1, MAX_RESIDUAL_CELLS).astype(int)]
        cells = np.zeros_like(cells)
        cells.ravel()[keep] = True
    optics, scale = optics_for(slide, na), full_scale_of(slide.dtype)
    of_output = reblur_residual(slide.data, output, dmap, optics, cells=cells, full_scale=scale)
    of_input = reblur_residual(slide.data, slide.data, dmap, optics, cells=cells, full_scale=scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (of_output / np.maximum(of_input, 1e-6)).astype(np.float32)
    return of_output, ratio


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def qc_slide(
    input: str | Path | Slide,
    out_dir: str | Path | None = None,
    *,
    mpp: float | None = None,
    na: float | None = None,
    blur_stops: float = DEFAULT_BLUR_STOPS,
    overwrite: bool = False,
) -> QcResult:
    """Focus map and defocus estimate of a slide, without refocusing it.

    Parameters
    ----------
    input : str or Path or Slide
        The slide.
    out_dir : str or Path, optional
        Folder for ``focus_qc.json``, ``focus_map.png`` and ``focus_qc.zarr`` (the maps);
        nothing is written when omitted.
    mpp : float, optional
        Pixel size override.
    na : float, optional
        Objective NA for the defocus estimate (default by modality).
    blur_stops : float
        Blur threshold in stops.
    overwrite : bool
        Replace existing files in ``out_dir``.

    Returns
    -------
    QcResult
    """
    from wsi_deepr.tissue import tissue_mask

    if isinstance(input, Slide):
        slide = input
    else:
        from wsi_deepr.readers import open_slide

        slide = open_slide(input, mpp=mpp)
    mask = np.asarray(tissue_mask(slide), dtype=bool)
    result, _ = assess(slide, mask, na=na, blur_stops=blur_stops, estimate=True)
    if out_dir is not None:
        _write_qc_outputs(slide, result, Path(out_dir), overwrite=overwrite)
    return result


def _write_qc_outputs(slide: Slide, result: QcResult, out: Path, *, overwrite: bool) -> None:
    import shutil

    import zarr

    targets = [out / JSON_NAME, out / PNG_NAME, out / "focus_qc.zarr"]
    if not overwrite and any(t.exists() for t in targets):
        raise OutputError(out, "already holds QC results", hint="pass --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if targets[2].exists():
            shutil.rmtree(targets[2])
        group = zarr.open_group(str(targets[2]), mode="w", zarr_format=3)
        write_maps(group, result)
        from wsi_deepr.heatmap import write_png

        write_png(slide, result, targets[1])
        summary = result.summary()
        summary["png"] = PNG_NAME
        targets[0].write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(out, f"cannot write QC results: {exc.strerror or exc}") from exc
