"""Focus QC maps as low-resolution images inside an OME-Zarr store (``focus_qc`` group).

NGFF label images must have the parent image's scale levels and integer pixels, so the
maps are not ``labels``: each is a single-level NGFF multiscale image of its own with axes
``y, x``; one pixel is one map cell of ``scale`` micrometres, centred like the level-0
pixels it covers. Images:

- ``focus_input``, ``focus_output``: focus score in stops (:mod:`wsi_deepr.focus`).
- ``blurred``: uint8, 1 where the input is blurred, 2 where it is and its tiles ran.
- ``defocus_um``, ``defocus_fit_rms_db``: :mod:`wsi_deepr.defocus_estimate`.
- ``reblur_residual``, ``reblur_residual_ratio``: the output re-blurred against the input,
  and that over the unchanged input's own residual (blurred cells only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_deepr.tiling import TilePlan

if TYPE_CHECKING:
    from wsi_deepr.qc import QcResult

GROUP = "focus_qc"
"""Group of the map images inside an OME-Zarr store."""


def write_maps(group: Any, result: QcResult, *, plan: TilePlan | None = None) -> None:
    """Write the maps as single-level NGFF images in ``group/focus_qc``."""
    ngff = "0.5" if group.metadata.zarr_format == 3 else "0.4"
    qc_group = group.require_group(GROUP)
    fine, coarse = result.focus_input.cell_px, 2 * result.focus_input.cell_px
    blurred = result.blurred().astype(np.uint8)
    if plan is not None and result.refocused_tiles is not None:
        ran = _tiles_to_cells(plan, fine, blurred.shape)
        blurred[(blurred == 1) & ran] = 2
    images: list[tuple[str, np.ndarray, int]] = [
        ("focus_input", result.focus_input.score, fine),
        ("blurred", blurred, fine),
    ]
    if result.defocus is not None:
        images.append(("defocus_um", result.defocus.defocus_um, coarse))
        images.append(("defocus_fit_rms_db", result.defocus.fit_rms_db, coarse))
    if result.focus_output is not None:
        images.append(("focus_output", result.focus_output.score, fine))
    if result.residual is not None and result.residual_ratio is not None:
        images.append(("reblur_residual", result.residual, coarse))
        images.append(("reblur_residual_ratio", result.residual_ratio, coarse))
    for name, values, cell_px in images:
        _write_image(qc_group, name, values, cell_px=cell_px, mpp=result.mpp, ngff=ngff)
    qc_group.attrs["wsi_deepr_focus_qc"] = {
        "images": [name for name, _, _ in images],
        "blur_stops": result.blur_stops,
        "focus_reference_log2": result.focus_input.reference_log2,
    }


def _tiles_to_cells(plan: TilePlan, cell_px: int, shape: tuple[int, ...]) -> np.ndarray:
    """Cells touched by the model's input (a tile, or its crop)."""
    ran = np.zeros(shape, dtype=bool)
    for i, j in zip(*np.nonzero(plan.tissue), strict=True):
        cy0, cy1, cx0, cx1 = plan.crop_of(i, j)
        y0, x0 = int(plan.origins_y[i]) + cy0, int(plan.origins_x[j]) + cx0
        y1, x1 = int(plan.origins_y[i]) + cy1, int(plan.origins_x[j]) + cx1
        ran[y0 // cell_px : -(-y1 // cell_px), x0 // cell_px : -(-x1 // cell_px)] = True
    return ran


def _write_image(
    group: Any, name: str, values: np.ndarray, *, cell_px: int, mpp: float, ngff: str
) -> None:
    image = group.require_group(name)
    level = "s0" if ngff == "0.5" else "0"
    options: dict[str, Any] = (
        {"dimension_names": ("y", "x")}
        if ngff == "0.5"
        else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    )
    fill = 0 if values.dtype.kind in "iu" else float("nan")
    array = image.create_array(level, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                               fill_value=fill, overwrite=True, **options)  # fmt: skip
    array[...] = values
    size_um = cell_px * mpp
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": level, "coordinateTransformations": [
            {"type": "scale", "scale": [size_um, size_um]},
            {"type": "translation", "translation": [mpp * (cell_px - 1) / 2] * 2},
        ]}],
    }  # fmt: skip
    if ngff == "0.5":
        image.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    else:
        image.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
