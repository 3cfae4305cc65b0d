"""``wsi-deepr info SLIDE``: what a slide holds, as text or JSON."""

from __future__ import annotations

import json
from typing import Any

import click


def describe(path: str, *, mpp: float | None = None, tissue: bool = True) -> dict[str, Any]:
    """Facts about a slide: format, levels, size, pixel size, channels, tissue.

    Parameters
    ----------
    path : str
        Slide file, OME-Zarr store or URL.
    mpp : float, optional
        Pixel size (micrometres per pixel) to use instead of the file's.
    tissue : bool
        Also detect tissue on the thumbnail (reads it).

    Returns
    -------
    dict
        JSON-serialisable description.
    """
    from wsi_deepr.readers import open_slide
    from wsi_deepr.tissue import tissue_fraction, tissue_mask

    slide = open_slide(path, mpp=mpp)
    h, w = slide.shape_yx
    info: dict[str, Any] = {
        "path": str(slide.path),
        "format": slide.format_name,
        "width_px": w,
        "height_px": h,
        "mpp": slide.mpp,
        "width_mm": w * slide.mpp * 1e-3,
        "height_mm": h * slide.mpp * 1e-3,
        "area_mm2": slide.area_mm2,
        "channels": list(slide.channel_names),
        "channel_colors": list(slide.channel_colors),
        "dtype": str(slide.dtype),
        "modality": slide.modality,
        "levels": [list(shape) for shape in slide.level_shapes],
        "thumbnail_shape": [int(n) for n in slide.thumbnail.shape],
        "thumbnail_downsample": slide.thumbnail_downsample,
        "chunks": [int(n) for n in slide.data.chunksize],
    }
    if tissue:
        fraction = tissue_fraction(tissue_mask(slide))
        info["tissue_fraction"] = fraction
        info["tissue_mm2"] = fraction * slide.area_mm2
    return info


def format_text(info: dict[str, Any]) -> str:
    """Human-readable lines of :func:`describe`'s dictionary."""
    levels = ", ".join(f"{shape[2]} x {shape[1]}" for shape in info["levels"])
    lines = [
        f"file       {info['path']}",
        f"format     {info['format']}",
        f"size       {info['width_px']} x {info['height_px']} px (w x h), "
        f"{info['width_mm']:.3f} x {info['height_mm']:.3f} mm, {info['area_mm2']:.3f} mm^2",
        f"mpp        {info['mpp']:.4g} um/px",
        f"channels   {len(info['channels'])}: {', '.join(info['channels'])}",
        f"dtype      {info['dtype']}",
        f"modality   {info['modality']}",
        f"levels     {len(info['levels'])}: {levels} (w x h)",
    ]
    if "tissue_fraction" in info:
        lines.append(
            f"tissue     {100 * info['tissue_fraction']:.1f} % ({info['tissue_mm2']:.3f} mm^2)"
        )
    return "\n".join(lines)


@click.command()
@click.argument("slide", type=str)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Pixel size in micrometres per pixel (overrides the file's; needed for PNG/JPEG).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-tissue", is_flag=True, help="Skip tissue detection (reads nothing more).")
def info(slide: str, mpp: float | None, as_json: bool, no_tissue: bool) -> None:
    """Show format, levels, size (px and mm), mpp, channels, dtype and tissue of SLIDE."""
    facts = describe(slide, mpp=mpp, tissue=not no_tissue)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        click.echo(format_text(facts))
