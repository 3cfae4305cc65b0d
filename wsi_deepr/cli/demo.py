"""``wsi-deepr demo OUTDIR``: defocus the bundled sample with a tilt, refocus it, compare.

Reads ``wsi_deepr/samples/CMU-1-Small-Region.svs`` (H&E, 0.499 um/px), puts it out of
focus with the physics module (Köhler brightfield, typical condenser; the blur in linear
light between sRGB decoding and encoding) as a sample tilted
along y (defocus from ``-max`` to ``+max`` micrometres), writes that as a tiled TIFF
slide, runs :func:`refocus_slide` on it with the default shipped model, and writes
``OUTDIR/out.zarr``, ``OUTDIR/side_by_side.png`` (input | output | ground truth, a
full-resolution crop of the most defocused band) and prints SSIM and RMSE before and
after (overall and per 1-um band of the tilt) and s/mm2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from wsi_deepr.local_dask import THREADS

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "CMU-1-Small-Region.svs"
DEFAULT_NA = 0.75
"""Objective NA for the simulation when the model card does not give one (20x/0.75)."""


def run_demo(
    outdir: str | Path,
    *,
    model: str | None = None,
    max_defocus_um: float = 4.0,
    device: str = "auto",
    size_px: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Defocus the bundled sample, refocus it and measure SSIM against the original.

    Parameters
    ----------
    outdir : str or Path
        Folder for ``defocused.tif``, ``out.zarr`` and ``side_by_side.png``.
    model : str, optional
        Model name or path; the default shipped brightfield model otherwise.
    max_defocus_um : float
        Defocus at the top and bottom edges (opposite signs), in micrometres.
    device : str
        ``--device`` of the run.
    size_px : int, optional
        Use only a centred square crop of this edge (quick checks).
    overwrite : bool
        Replace existing outputs in ``outdir``.

    Returns
    -------
    dict
        ``ssim_before``, ``ssim_after``, ``rmse_before``, ``rmse_after`` (grey levels of
        8 bits), ``bands`` (per 1-um band of the tilt's defocus, the band and those four
        figures over its pixels),
        ``s_per_mm2``, ``report`` and the paths.
    """
    import tifffile
    from skimage.metrics import structural_similarity

    from wsi_deepr.errors import OutputError
    from wsi_deepr.model_registry import resolve_model
    from wsi_deepr.pairs import linear_to_srgb, srgb_to_linear
    from wsi_deepr.physics import defocus_image, scanner_optics, tilt_defocus_map
    from wsi_deepr.readers import open_slide
    from wsi_deepr.run import refocus_slide

    out_dir = Path(outdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    defocused_path = out_dir / "defocused.tif"
    if defocused_path.exists() and not overwrite:
        raise OutputError(defocused_path, "already exists", hint="pass --overwrite")

    sample = open_slide(SAMPLE)
    truth = np.asarray(sample.data.compute(scheduler=THREADS))
    if size_px:
        h, w = truth.shape[1:]
        y0, x0 = max(0, (h - size_px) // 2), max(0, (w - size_px) // 2)
        truth = truth[:, y0 : y0 + size_px, x0 : x0 + size_px]
    mpp = sample.mpp
    card = resolve_model(model, sample).card
    na = card.objective_na or DEFAULT_NA
    height = truth.shape[1]
    tilt_deg = math.degrees(math.atan(2 * max_defocus_um / max(1.0, (height - 1) * mpp)))
    defocus_map = tilt_defocus_map(truth.shape[1:], mpp=mpp, tilt_deg=tilt_deg)
    # Light blurs in linear intensity; the scan's values are sRGB-encoded (as training and
    # the evaluation simulate it: blurring the encoded values darkens every edge's blur).
    blurred = defocus_image(
        srgb_to_linear(truth.astype(np.float32) / 255.0),
        defocus_map,
        optics=scanner_optics(na, mpp),
        z_step_um=0.25,
    )
    defocused = np.clip(np.rint(linear_to_srgb(blurred) * 255.0), 0, 255).astype(np.uint8)
    resolution = 1e4 / mpp  # pixels per centimetre
    tifffile.imwrite(
        defocused_path,
        np.moveaxis(defocused, 0, -1),
        tile=(256, 256),
        photometric="rgb",
        resolution=(resolution, resolution),
        resolutionunit="CENTIMETER",
        metadata=None,
    )

    report = refocus_slide(
        defocused_path, out_dir / "out.zarr", model=model, device=device, overwrite=overwrite
    )
    refocused = np.asarray(open_slide(out_dir / "out.zarr").data.compute(scheduler=THREADS))

    def ssim(image: np.ndarray) -> tuple[float, np.ndarray]:
        value, local = structural_similarity(
            image, truth, channel_axis=0, data_range=255.0, full=True
        )
        return float(value), local.mean(axis=0)

    def squared_error(image: np.ndarray) -> np.ndarray:
        diff = image.astype(np.float64) - truth.astype(np.float64)
        return np.asarray((diff * diff).mean(axis=0))

    before, before_map = ssim(defocused)
    after, after_map = ssim(refocused)
    before_se, after_se = squared_error(defocused), squared_error(refocused)
    # SSIM per 1-um band of the tilt's defocus (the map averaged over the band's pixels)
    first = math.floor(float(defocus_map.min()) + 1e-6)
    n_bands = max(1, math.ceil(float(defocus_map.max()) - 1e-6) - first)
    band_of = np.clip(np.floor(defocus_map - first).astype(int), 0, n_bands - 1)
    bands = []
    for k in range(n_bands):
        inside = band_of == k
        if inside.any():
            bands.append({"defocus_um": [float(first + k), float(first + k + 1)],
                          "ssim_before": float(before_map[inside].mean()),
                          "ssim_after": float(after_map[inside].mean()),
                          "rmse_before": math.sqrt(float(before_se[inside].mean())),
                          "rmse_after": math.sqrt(float(after_se[inside].mean()))})  # fmt: skip

    png = out_dir / "side_by_side.png"
    _side_by_side(png, [defocused, refocused, truth], defocus_map)
    return {
        "ssim_before": before,
        "ssim_after": after,
        "rmse_before": math.sqrt(float(before_se.mean())),
        "rmse_after": math.sqrt(float(after_se.mean())),
        "bands": bands,
        "s_per_mm2": report.s_per_mm2,
        "max_defocus_um": max_defocus_um,
        "tilt_deg": tilt_deg,
        "report": report,
        "png": png,
        "zarr": out_dir / "out.zarr",
    }


def _side_by_side(path: Path, images: list[np.ndarray], defocus_map: np.ndarray) -> None:
    """Input | output | ground truth: a full-resolution crop where defocus is largest."""
    from PIL import Image

    crop_px = 768
    h, w = images[0].shape[1:]
    row = int(np.argmax(np.abs(defocus_map).mean(axis=1)))
    y0 = int(np.clip(row - crop_px // 2, 0, max(0, h - crop_px)))
    x0 = max(0, (w - crop_px) // 2)
    panels = [np.moveaxis(im[:, y0 : y0 + crop_px, x0 : x0 + crop_px], 0, -1) for im in images]
    gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
    strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    Image.fromarray(strip).save(path)


@click.command("demo")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=str))
@click.option("--model", metavar="NAME|PATH", default=None, help="Model (default: shipped).")
@click.option("--max-defocus-um", type=click.FloatRange(min=0), default=4.0, show_default=True,
              help="Defocus at the top and bottom edges of the tilted sample.")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              default="auto", show_default=True)  # fmt: skip
@click.option("--size-px", type=click.IntRange(min=64), default=None,
              help="Use a centred square crop of this edge (quick check).")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace existing outputs in OUTDIR.")
def demo(
    outdir: str,
    model: str | None,
    max_defocus_um: float,
    device: str,
    size_px: int | None,
    overwrite: bool,
) -> None:
    """Defocus the bundled H&E sample with a tilt, refocus it, report SSIM and s/mm2."""
    result = run_demo(
        outdir,
        model=model,
        max_defocus_um=max_defocus_um,
        device=device,
        size_px=size_px,
        overwrite=overwrite,
    )
    click.echo(
        f"SSIM to the in-focus original: before {result['ssim_before']:.3f}, "
        f"after {result['ssim_after']:.3f} (tilt {result['tilt_deg']:.3f} deg, "
        f"defocus +-{result['max_defocus_um']:g} um)"
    )
    click.echo(
        f"RMSE (grey levels): before {result['rmse_before']:.2f}, after {result['rmse_after']:.2f}"
    )
    click.echo("per 1-um band of the tilt: SSIM before -> after, RMSE before -> after")
    for band in result["bands"]:
        lo, hi = band["defocus_um"]
        click.echo(
            f"  z {lo:+g}..{hi:+g} um: {band['ssim_before']:.3f} -> {band['ssim_after']:.3f} "
            f"({band['ssim_after'] - band['ssim_before']:+.3f}), "
            f"{band['rmse_before']:.2f} -> {band['rmse_after']:.2f}"
        )
    click.echo(f"{result['report'].s_per_mm2:.2f} s/mm2 ({result['report'].provider})")
    click.echo(f"wrote {result['zarr']} and {result['png']}")
