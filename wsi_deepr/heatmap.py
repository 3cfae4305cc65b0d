"""Heat-map PNG of the focus QC: maps over the slide thumbnail, panels side by side.

Each panel shows the thumbnail in grey with one map over the tissue in colour, a title,
and a colour bar with its unit underneath; blurred regions are outlined in black.
Drawn with Pillow only (no plotting library needed at run time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from wsi_deepr.defocus_estimate import UNEXPLAINED_DB
from wsi_deepr.focus import coarse_of
from wsi_deepr.slide import Slide

if TYPE_CHECKING:
    from wsi_deepr.qc import QcResult

PANEL_PX = 440
"""Longer edge of each panel's image."""

# Anchors of the colour maps (position 0..1, RGB).
FOCUS_COLORS = ((0.0, (165, 0, 38)), (0.35, (244, 109, 67)), (0.6, (254, 224, 139)),
                (0.8, (166, 217, 106)), (1.0, (0, 104, 55)))  # fmt: skip
"""Red (blurred) through yellow to green (sharp)."""
DEFOCUS_COLORS = ((0.0, (252, 253, 191)), (0.25, (254, 159, 109)), (0.5, (222, 73, 104)),
                  (0.75, (140, 41, 129)), (1.0, (0, 0, 4)))  # fmt: skip
"""Light (in focus) to dark (far out of focus), like magma reversed."""


@dataclass(frozen=True, slots=True)
class Panel:
    """One map to draw over the thumbnail."""

    title: str
    """Text above the panel."""
    values: np.ndarray
    """``(ny, nx)`` map on a grid of ``cell_px`` level-0 pixels; NaN is not drawn."""
    cell_px: int
    """Level-0 pixels per map cell."""
    limits: tuple[float, float]
    """Values at the two ends of the colour bar."""
    unit: str
    """Colour bar label."""
    colors: tuple[tuple[float, tuple[int, int, int]], ...] = FOCUS_COLORS
    """Colour map anchors."""
    outline: np.ndarray | None = None
    """``(ny', nx')`` bool regions to outline (on the focus grid), with ``outline_cell_px``."""
    outline_cell_px: int = 0
    """Level-0 pixels per outline cell."""


def colorize(values: np.ndarray, limits: tuple[float, float], colors: tuple) -> np.ndarray:
    """``(..., 3)`` uint8 colours of values clipped to ``limits``."""
    lo, hi = limits
    t = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    stops = np.array([c[0] for c in colors])
    rgb = np.array([c[1] for c in colors], dtype=np.float64)
    out = np.stack([np.interp(t, stops, rgb[:, k]) for k in range(3)], axis=-1)
    return np.asarray(np.rint(out), dtype=np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _cell_index(n_px: int, level0_per_px: float, cell_px: int, n_cells: int) -> np.ndarray:
    """Map cell under each thumbnail pixel along one axis."""
    index = (np.arange(n_px) + 0.5) * level0_per_px // cell_px
    return np.minimum(index, n_cells - 1).astype(np.int64)


def _map_on_thumbnail(
    grey: np.ndarray, panel: Panel, level0_per_px: float, alpha: float = 0.6
) -> np.ndarray:
    """Blend the panel's colours over a grey thumbnail ``(h, w)`` uint8 -> ``(h, w, 3)``."""
    h, w = grey.shape
    ny, nx = panel.values.shape
    rows = _cell_index(h, level0_per_px, panel.cell_px, ny)
    sampled = panel.values[np.ix_(rows, _cell_index(w, level0_per_px, panel.cell_px, nx))]
    colour = colorize(sampled, panel.limits, panel.colors).astype(np.float32)
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    shown = np.isfinite(sampled)[..., None]
    out = np.where(shown, (1 - alpha) * base + alpha * colour, base)
    if panel.outline is not None and panel.outline.any():
        cell = panel.outline_cell_px
        region = panel.outline[
            np.ix_(
                _cell_index(h, level0_per_px, cell, panel.outline.shape[0]),
                _cell_index(w, level0_per_px, cell, panel.outline.shape[1]),
            )
        ]
        edge = region & ~ndimage.binary_erosion(region, iterations=2, border_value=0)
        out[edge] = (0.0, 0.0, 0.0)
    return np.asarray(np.clip(out, 0, 255), dtype=np.uint8)


def render(
    thumbnail_rgb: np.ndarray,
    level0_per_px: float,
    panels: list[Panel],
    *,
    heading: str = "",
) -> Image.Image:
    """Panels side by side over one thumbnail.

    Parameters
    ----------
    thumbnail_rgb : ndarray of shape (h, w, 3), uint8
        The slide at low resolution.
    level0_per_px : float
        Level-0 pixels per thumbnail pixel.
    panels : list of Panel
        Maps to show, left to right.
    heading : str
        A line of text above the panels (slide name, figures).

    Returns
    -------
    PIL.Image.Image
    """
    thumb = Image.fromarray(thumbnail_rgb)
    scale = PANEL_PX / max(thumb.size)
    if scale < 1:
        thumb = thumb.resize(
            (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
            Image.Resampling.LANCZOS,
        )
        level0_per_px = level0_per_px / scale
    rgb = np.asarray(thumb)
    grey = np.asarray(rgb.mean(axis=-1) * 0.6 + 100, dtype=np.uint8)  # lightened, no colour
    w, h = thumb.size
    pad, title_px, bar_px = 12, 30, 62
    head_px = 28 if heading else 0
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, head_px + title_px + h + bar_px),
                       "white")  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    big, small = _font(18), _font(14)
    if heading:
        draw.text((pad, 6), heading, fill="black", font=small)
    for k, panel in enumerate(panels):
        x0 = pad + k * (w + pad)
        y0 = head_px + title_px
        draw.text((x0, head_px + 6), panel.title, fill="black", font=big)
        canvas.paste(Image.fromarray(_map_on_thumbnail(grey, panel, level0_per_px)), (x0, y0))
        # colour bar
        bar_w = max(80, min(w - 56, 320))  # room for the unit on the right
        ramp = np.linspace(panel.limits[0], panel.limits[1], bar_w)
        bar = np.repeat(colorize(ramp, panel.limits, panel.colors)[None], 14, axis=0)
        by = y0 + h + 8
        canvas.paste(Image.fromarray(bar), (x0, by))
        draw.rectangle((x0, by, x0 + bar_w - 1, by + 13), outline="black")
        lo, hi = panel.limits
        for value in np.linspace(lo, hi, 5):
            tx = x0 + round((value - lo) / (hi - lo) * (bar_w - 1))
            draw.line((tx, by + 14, tx, by + 18), fill="black")
            label = f"{value:g}"
            draw.text((tx - 4 * len(label), by + 20), label, fill="black", font=small)
        draw.text((x0 + bar_w + 8, by), panel.unit, fill="black", font=small)
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write the PNG (256-colour palette: a third of the size, same look) and return its path."""
    target = Path(path)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target)
    return target


def thumbnail_rgb(slide: Slide) -> tuple[np.ndarray, float]:
    """The slide's thumbnail as ``(h, w, 3)`` uint8 and level-0 pixels per thumbnail pixel."""
    from wsi_deepr.tissue import _thumbnail

    image = np.asarray(_thumbnail(slide))
    if slide.thumbnail.dtype == np.uint8:
        top = 255.0
    else:  # 16-bit or float fluorescence rarely fills its range: stretch to what is there
        top = float(np.percentile(image, 99.5)) or 1.0
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    u8 = np.clip(rgb / top * 255.0, 0, 255).astype(np.uint8)
    return np.moveaxis(u8, 0, -1), float(slide.thumbnail_downsample)


def _defocus_shown(result: QcResult) -> np.ndarray:
    """Defocus where it means something: cells whose four focus cells are all judged and
    all blurred or all sharp (windows across a focus edge or the tissue edge mix two
    states no single defocus explains), and the fit explains the spectrum."""
    assert result.defocus is not None
    z = result.defocus.defocus_um
    judged = coarse_of(result.focus_input.judged.astype(np.float32))[: z.shape[0], : z.shape[1]]
    blurred = coarse_of(result.blurred().astype(np.float32))[: z.shape[0], : z.shape[1]]
    clean = (judged == 1.0) & ((blurred == 0.0) | (blurred == 1.0))
    explained = result.defocus.fit_rms_db <= UNEXPLAINED_DB
    return np.where(clean & explained, z, np.nan)


def write_png(slide: Slide, result: QcResult, path: str | Path) -> Path:
    """The heat-map PNG: input focus, output focus (after a run), estimated defocus."""
    thumb, per_px = thumbnail_rgb(slide)
    blurred = result.blurred()
    fine = result.focus_input.cell_px
    limits = (-6.0, 1.0)
    panels = [Panel("focus, input", result.focus_input.score, fine, limits, "stops",
                    outline=blurred, outline_cell_px=fine)]  # fmt: skip
    if result.focus_output is not None:
        panels.append(Panel("focus, output", result.focus_output.score, fine, limits, "stops",
                            outline=blurred, outline_cell_px=fine))  # fmt: skip
    if result.defocus is not None:
        panels.append(Panel("estimated defocus |z|", _defocus_shown(result), 2 * fine,
                            (0.0, 8.0), "um", colors=DEFOCUS_COLORS, outline=blurred,
                            outline_cell_px=fine))  # fmt: skip
    s = result.summary()["focus"]
    heading = (
        f"{Path(result.slide_path).name}: {100 * s['blurred_fraction']:.1f}% of tissue blurred "
        f"(score < -{result.blur_stops:g} stops, outlined); 0 stops = the slide's in-focus tissue"
    )
    return save_png(render(thumb, per_px, panels, heading=heading), path)
