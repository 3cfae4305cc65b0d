"""Hostile inputs made by code: broken, degenerate and contradictory slides and stores.

Each maker writes one input into a folder and returns its path. They are shared by the
reader tests (``test_readers.py``, the library level) and the hostile-input suite
(``test_hostile.py``, end to end through ``wsi-deepr run``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from slides import make_ome_tiff, make_ome_zarr, make_tiff_slide, synthetic_tissue

STRIP_PX = 1_000_000
"""Length of the one-pixel strips."""


def _resolution(mpp: float) -> dict[str, Any]:
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def random_bytes(path: Path, *, n_bytes: int = 4096, seed: int = 0, prefix: bytes = b"") -> Path:
    """``prefix`` followed by random bytes (a slide extension on noise)."""
    noise = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8)
    path.write_bytes(prefix + bytes(noise))
    return path


def small_tiled_tiff(path: Path, *, compression: str | None = "zlib") -> Path:
    """A single-level RGB tiled TIFF of 300 x 400 px, 64-px tiles, 0.5 um/px."""
    image = synthetic_tissue((300, 400), seed=10)
    return make_tiff_slide(path, image, 0.5, tile=64, pyramid=False, compression=compression)


def truncated_tiff(path: Path, *, keep: float = 0.5, pyramid: bool = False) -> Path:
    """A tiled TIFF cut after ``keep`` of its bytes."""
    whole = path.with_name("whole-" + path.name)
    if pyramid:
        image = synthetic_tissue((700, 900), seed=10)
        make_tiff_slide(whole, image, 0.5, tile=64, compression="zlib")
    else:
        small_tiled_tiff(whole)
    data = whole.read_bytes()
    whole.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def tiff_with_tile_offset_past_end(path: Path, *, tile_index: int = 3) -> Path:
    """A tiled TIFF whose tile ``tile_index`` starts 10 kB beyond the end of the file."""
    small_tiled_tiff(path)
    size = path.stat().st_size
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tag = tif.pages[0].tags["TileOffsets"]
        offsets = list(tag.value)
        offsets[tile_index] = size + 10_000
        tag.overwrite(offsets)
    return path


def zero_width_tiff(path: Path) -> Path:
    """A tiled TIFF whose ImageWidth tag says 0."""
    small_tiled_tiff(path, compression=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(0)
    return path


def plain_tiff(path: Path, image_cyx: np.ndarray, *, mpp: float | None = 0.5) -> Path:
    """A single-level TIFF in tifffile's defaults: RGB(A) interleaved, else planar grey."""
    rgb = image_cyx.shape[0] in (3, 4) and image_cyx.dtype.kind == "u"
    data = np.moveaxis(image_cyx, 0, -1) if rgb else image_cyx
    if not rgb and image_cyx.shape[0] == 1:
        data = image_cyx[0]
    extra: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack", "metadata": None}
    if not rgb and image_cyx.shape[0] > 1:
        extra["planarconfig"] = "separate"
    tifffile.imwrite(path, data, **extra, **(_resolution(mpp) if mpp is not None else {}))
    return path


def one_pixel_strip(length_px: int = STRIP_PX, *, vertical: bool = False) -> np.ndarray:
    """A one-pixel-wide uint8 ramp ``(1, 1, length)`` (or ``(1, length, 1)``)."""
    line = (np.arange(length_px) % 251).astype(np.uint8)
    return line[None, :, None] if vertical else line[None, None, :]


def float_tiff_with(path: Path, value: float, *, level0_only: bool = False) -> Path:
    """A float32 fluorescence TIFF with one pixel set to ``value`` (NaN or infinity).

    With ``level0_only`` the file has a stored 2x level without the bad pixel (as a
    scanner that averaged it away would write) and level 0 is longer than a thumbnail,
    so the bad pixel is met only while level 0 is being refocused.
    """
    shape = (2100, 96) if level0_only else (300, 300)
    clean = synthetic_tissue(shape, seed=12, rgb=False, dtype=np.float32)
    bad = clean.copy()
    bad[0, shape[0] - 10, shape[1] - 20] = value
    if not level0_only:
        return make_tiff_slide(path, bad, 0.5, tile=64, pyramid=False)
    level1 = clean[:, ::2, ::2]
    with tifffile.TiffWriter(path) as tif:
        tif.write(bad, tile=(64, 64), photometric="minisblack", metadata=None, **_resolution(0.5))
        tif.write(level1, tile=(64, 64), photometric="minisblack", subfiletype=1, metadata=None,
                  **_resolution(1.0))  # fmt: skip
    return path


def ome_tiff_with_mpp(path: Path, mpp: float | None) -> Path:
    """A small 2-channel uint16 OME-TIFF whose PhysicalSizeX/Y says ``mpp`` (or nothing)."""
    image = synthetic_tissue((64, 80), seed=7, rgb=False, n_channels=2, dtype=np.uint16)
    return make_ome_tiff(path, image, mpp, tile=16, pyramid=False)


def ome_zarr_pyramid(path: Path, *, shape_yx: tuple[int, int] = (2100, 96)) -> Path:
    """An RGB OME-Zarr 0.5 pyramid, 512-px chunks; level 0 is longer than a thumbnail."""
    image = synthetic_tissue(shape_yx, seed=20)
    return make_ome_zarr(path, image, 0.5, version="0.5")


def edit_ome_metadata(store: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    """Apply ``edit`` to the ``ome`` attributes of an NGFF 0.5 store, in place."""
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["ome"])
    meta_path.write_text(json.dumps(meta))
    return store


def zarr_without_level(path: Path, level: str = "s1") -> Path:
    """An OME-Zarr pyramid whose metadata lists ``level`` but whose array is gone."""
    ome_zarr_pyramid(path)
    shutil.rmtree(path / level)
    return path


def zarr_with_corrupt_chunk(path: Path, *, in_thumbnail: bool) -> Path:
    """An OME-Zarr pyramid with one chunk that is not a valid zstd frame.

    The chunk is in the level read for the thumbnail (found before anything is written)
    or in level 0 only (found while level 0 is being refocused).
    """
    ome_zarr_pyramid(path)
    level = "s1" if in_thumbnail else "s0"
    (path / level / "c" / "0" / "1" / "0").write_bytes(b"not a zstd frame")
    return path


def zarr_with_zero_sized_level(path: Path) -> Path:
    """An OME-Zarr 0.5 image whose only level has shape ``(3, 0, 0)``."""
    make_ome_zarr(path, np.zeros((3, 0, 0), np.uint8), 0.5, pyramid=False)
    return path


def zarr_with_pixel_size(path: Path, mpp: float | str) -> Path:
    """An OME-Zarr pyramid whose level-0 scale says ``mpp`` micrometres."""
    ome_zarr_pyramid(path)

    def edit(ome: dict[str, Any]) -> None:
        transform = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
        transform["scale"] = [1.0, mpp, mpp]

    return edit_ome_metadata(path, edit)


def truncated_jpeg(path: Path) -> Path:
    """An RGB JPEG cut in half."""
    from slides import make_jpeg

    whole = make_jpeg(path.with_name("whole-" + path.name), synthetic_tissue((300, 400), seed=9))
    data = whole.read_bytes()
    whole.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path
