"""Small real slides made by code, for tests of every stage.

Every helper takes an image of shape ``(c, y, x)`` and writes it in one file format with
a known pixel size, so a test can compare what a reader returns with what was written.
Importable by any test module: ``from slides import make_tiff_slide, synthetic_tissue``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

RGB_COLORS = ("FF0000", "00FF00", "0000FF")


def synthetic_tissue(
    shape_yx: tuple[int, int],
    *,
    seed: int,
    rgb: bool = True,
    n_channels: int = 1,
    dtype: np.dtype | type = np.uint8,
) -> np.ndarray:
    """An image that looks like tissue: H&E-like blobs on white, or nuclei on black.

    Parameters
    ----------
    shape_yx : tuple of int
        Height and width in pixels.
    seed : int
        Seed of the random generator; the same seed gives the same image.
    rgb : bool
        ``True``: brightfield RGB (pink stroma, purple nuclei, white background).
        ``False``: fluorescence, ``n_channels`` channels, bright spots on a dark background.
    n_channels : int
        Channels of the fluorescence image (ignored for RGB).
    dtype : dtype
        ``uint8``, ``uint16`` or a float type (floats are scaled to 0..1).

    Returns
    -------
    ndarray of shape (C, Y, X)
        ``C = 3`` for RGB.
    """
    from scipy import ndimage

    h, w = (int(shape_yx[0]), int(shape_yx[1]))
    rng = np.random.default_rng(seed)
    # Low-resolution random fields, smoothed and upsampled: cheap even for 3000 x 2000 px.
    step = 8
    lh, lw = max(1, -(-h // step)), max(1, -(-w // step))

    def field(sigma: float) -> np.ndarray:
        small = ndimage.gaussian_filter(rng.standard_normal((lh, lw)), sigma, mode="wrap")
        small = ((small - small.mean()) / (small.std() + 1e-9)).astype(np.float32)
        big = np.repeat(np.repeat(small, step, axis=0), step, axis=1)[:h, :w]
        return ndimage.uniform_filter(big, size=min(step, h, w))

    def noise(c: int, sigma: float) -> np.ndarray:
        # A small noise patch repeated: drawing 10^7 normals would dominate the run time.
        patch = rng.normal(0.0, sigma, (c, 251, 257)).astype(np.float32)
        reps = (1, -(-h // 251), -(-w // 257))
        return np.tile(patch, reps)[:, :h, :w]

    tissue = field(6.0) > 0.3
    nuclei = (field(1.0) > 1.2) & tissue
    if rgb:
        img = np.empty((3, h, w), np.float32)
        background = (0.95, 0.95, 0.96)
        stroma = (0.90, 0.60, 0.75)
        nucleus = (0.45, 0.25, 0.60)
        for c in range(3):
            img[c] = np.where(nuclei, nucleus[c], np.where(tissue, stroma[c], background[c]))
        img += noise(3, 0.015)
    else:
        img = np.empty((n_channels, h, w), np.float32)
        for c in range(n_channels):
            spots = field(1.0 + 0.3 * c) > 1.0 + 0.1 * c
            img[c] = np.where(spots & tissue, 0.8, np.where(tissue, 0.12, 0.03))
        img += noise(n_channels, 0.01)
    img = np.clip(img, 0.0, 1.0)
    out_dtype = np.dtype(dtype)
    if out_dtype.kind == "f":
        return img.astype(out_dtype)
    return np.round(img * np.iinfo(out_dtype).max).astype(out_dtype)


def downsample2(image_cyx: np.ndarray) -> np.ndarray:
    """Halve height and width by 2 x 2 area means (odd edges trimmed), keeping the dtype."""
    c, h, w = image_cyx.shape
    h2, w2 = max(1, h // 2), max(1, w // 2)
    if h < 2 or w < 2:
        return image_cyx[:, ::2, ::2][:, :h2, :w2].copy()
    blocks = image_cyx[:, : h2 * 2, : w2 * 2].reshape(c, h2, 2, w2, 2).mean(axis=(2, 4))
    if image_cyx.dtype.kind in "iu":
        return np.round(blocks).astype(image_cyx.dtype)
    return blocks.astype(image_cyx.dtype)


def pyramid_levels(image_cyx: np.ndarray, *, min_px: int = 256) -> list[np.ndarray]:
    """Level 0 and its 2x reductions until the long side is at most ``min_px``."""
    levels = [image_cyx]
    while max(levels[-1].shape[1:]) > min_px and min(levels[-1].shape[1:]) >= 2:
        levels.append(downsample2(levels[-1]))
    return levels


def _resolution_kwargs(mpp: float | None) -> dict:
    if mpp is None:
        return {}
    px_per_cm = 1e4 / mpp
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def make_tiff_slide(
    path: str | Path,
    image_cyx: np.ndarray,
    mpp: float | None,
    *,
    tile: int = 256,
    pyramid: bool = True,
    layout: str = "pages",
    compression: str | None = None,
) -> Path:
    """Write a tiled (optionally pyramidal) plain TIFF with resolution tags.

    Parameters
    ----------
    path : str or Path
        File to write.
    image_cyx : ndarray of shape (C, Y, X)
        Level 0. ``C = 3`` uint8 is written as RGB (interleaved); other channel counts
        as planar grey pages.
    mpp : float or None
        Pixel size in micrometres per pixel, written as X/YResolution in pixels per cm;
        ``None`` writes no resolution tags.
    tile : int
        Tile edge in pixels (multiple of 16).
    pyramid : bool
        Also write 2x reduced levels down to about 256 px.
    layout : {"pages", "subifds"}
        Reduced levels as pages of their own (what OpenSlide reads) or as SubIFDs.
    compression : str, optional
        TIFF compression, e.g. ``"zlib"`` or ``"jpeg"``; none by default.

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    levels = pyramid_levels(image_cyx) if pyramid else [image_cyx]
    rgb = image_cyx.shape[0] == 3 and image_cyx.dtype == np.uint8

    def as_written(level: np.ndarray) -> np.ndarray:
        if rgb:
            return np.moveaxis(level, 0, -1)
        return level[0] if level.shape[0] == 1 else level

    options = {
        "tile": (tile, tile),
        "photometric": "rgb" if rgb else "minisblack",
        "compression": compression,
        "metadata": None,
    }
    if not rgb and image_cyx.shape[0] > 1:
        options["planarconfig"] = "separate"
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        if layout == "subifds":
            tif.write(
                as_written(levels[0]),
                subifds=len(levels) - 1,
                **_resolution_kwargs(mpp),
                **options,
            )
            for k, level in enumerate(levels[1:], start=1):
                tif.write(
                    as_written(level),
                    subfiletype=1,
                    **_resolution_kwargs(None if mpp is None else mpp * 2**k),
                    **options,
                )
        else:
            for k, level in enumerate(levels):
                tif.write(
                    as_written(level),
                    subfiletype=1 if k else 0,
                    **_resolution_kwargs(None if mpp is None else mpp * 2**k),
                    **options,
                )
    return path


def make_ome_tiff(
    path: str | Path,
    image_cyx: np.ndarray,
    mpp: float | None,
    *,
    tile: int = 256,
    pyramid: bool = True,
    channel_names: tuple[str, ...] | None = None,
    compression: str | None = None,
) -> Path:
    """Write a tiled OME-TIFF, reduced levels as SubIFDs, pixel size in the OME-XML.

    Parameters
    ----------
    path : str or Path
        File to write (``.ome.tif``).
    image_cyx : ndarray of shape (C, Y, X)
        Level 0, any channel count and dtype tifffile can write.
    mpp : float or None
        ``PhysicalSizeX/Y`` in micrometres; ``None`` leaves it out.
    tile : int
        Tile edge in pixels (multiple of 16).
    pyramid : bool
        Also write 2x reduced levels (as SubIFDs) down to about 256 px.
    channel_names : tuple of str, optional
        Names written into the OME ``Channel`` elements.
    compression : str, optional
        TIFF compression; none by default.

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    levels = pyramid_levels(image_cyx) if pyramid else [image_cyx]
    metadata: dict = {"axes": "CYX"}
    if mpp is not None:
        metadata.update(
            PhysicalSizeX=mpp,
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=mpp,
            PhysicalSizeYUnit="µm",
        )
    if channel_names is not None:
        metadata["Channel"] = {"Name": list(channel_names)}
    options = {
        "tile": (tile, tile),
        "photometric": "minisblack",
        "compression": compression,
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, metadata=None, **options)
    return path


def make_ome_zarr(
    path: str | Path,
    image_cyx: np.ndarray,
    mpp: float,
    *,
    version: str = "0.5",
    chunk_px: int = 512,
    pyramid: bool = True,
    channel_names: tuple[str, ...] | None = None,
) -> Path:
    """Write an OME-Zarr image (NGFF 0.4 on zarr 2 or 0.5 on zarr 3) with ome-zarr-py.

    Parameters
    ----------
    path : str or Path
        Store directory to create.
    image_cyx : ndarray of shape (C, Y, X)
        Level 0.
    mpp : float
        Pixel size of level 0 in micrometres; level ``k`` gets ``mpp * 2**k``.
    version : {"0.5", "0.4"}
        NGFF version.
    chunk_px : int
        Chunk edge in y and x.
    pyramid : bool
        Also write 2x reduced levels down to about 256 px.
    channel_names : tuple of str, optional
        ``omero`` channel labels; RGB names for 3-channel uint8 when omitted.

    Returns
    -------
    Path
        The store written.
    """
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.format import FormatV04, FormatV05
        from ome_zarr.writer import write_multiscale

    path = Path(path)
    fmt = FormatV05() if version == "0.5" else FormatV04()
    levels = pyramid_levels(image_cyx) if pyramid else [image_cyx]
    c = image_cyx.shape[0]
    if channel_names is None:
        channel_names = ("R", "G", "B") if c == 3 else tuple(f"C{i}" for i in range(c))
    colors = RGB_COLORS if c == 3 else ("FFFFFF",) * c
    top = float(np.iinfo(image_cyx.dtype).max) if image_cyx.dtype.kind in "iu" else 1.0
    omero = {
        "channels": [
            {
                "label": name,
                "color": color,
                "active": True,
                "window": {"start": 0.0, "end": top, "min": 0.0, "max": top},
            }
            for name, color in zip(channel_names, colors, strict=True)
        ]
    }
    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    transforms = [
        [{"type": "scale", "scale": [1.0, mpp * 2**k, mpp * 2**k]}] for k in range(len(levels))
    ]
    with warnings.catch_warnings():
        # ome-zarr 0.18 deprecates explicit transformations; they say exactly what we mean
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale(
            levels,
            group,
            fmt=fmt,
            axes=axes,
            coordinate_transformations=transforms,
            storage_options={"chunks": (c, chunk_px, chunk_px)},
            metadata={"omero": omero},
        )
    return path


def make_png(path: str | Path, image_cyx: np.ndarray) -> Path:
    """Write a PNG (1 or 3 channels, 8- or 16-bit) from ``(c, y, x)``."""
    from PIL import Image

    path = Path(path)
    if image_cyx.shape[0] == 1:
        arr = image_cyx[0]
    else:
        arr = np.moveaxis(image_cyx, 0, -1)
    Image.fromarray(arr).save(path)
    return path


def make_jpeg(path: str | Path, image_cyx: np.ndarray, *, quality: int = 95) -> Path:
    """Write a JPEG from an 8-bit ``(c, y, x)`` image with 1 or 3 channels."""
    from PIL import Image

    path = Path(path)
    arr = image_cyx[0] if image_cyx.shape[0] == 1 else np.moveaxis(image_cyx, 0, -1)
    Image.fromarray(arr).save(path, quality=quality)
    return path
