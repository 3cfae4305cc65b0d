"""PNG and JPEG single fields of view, read whole (they are small by nature).

These formats carry no trustworthy pixel size (a "72 dpi" tag says nothing about the
microscope), so the pixel size must come from ``--mpp``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import dask.array as da
import numpy as np

from wsi_deepr.errors import InputError, MetadataError, UnsupportedFormatError
from wsi_deepr.readers.base import (
    CHUNK_PX,
    block_mean,
    check_user_mpp,
    default_channels,
    guess_modality,
)
from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")


def _decode(path: str) -> tuple[np.ndarray, bool, str]:
    """Decode to ``(c, y, x)``; say whether it is RGB and which format it was."""
    from PIL import Image

    try:
        # PIL's own limit (about 179 megapixels) stays: beyond it a tiled format is the answer.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                fmt = str(opened.format or "image").lower()
                mode = opened.mode
                image: Image.Image = opened
                if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
                    # Alpha is dropped: microscopy PNGs store a constant one, if any.
                    image = image.convert("RGB" if mode != "LA" else "L")
                elif mode in ("P", "CMYK", "YCbCr", "1"):
                    image = image.convert("RGB" if mode != "1" else "L")
                mode = image.mode
                array = np.asarray(image)
    except Image.DecompressionBombError as exc:
        raise InputError(
            path, f"image too large for a single field of view ({exc})", hint="use a tiled TIFF"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # PIL reports truncated and corrupt files as OSError/SyntaxError
        raise InputError(path, f"cannot decode the image: {exc}") from exc
    if mode == "I;16" or (array.dtype.kind in "iu" and array.dtype.itemsize == 2):
        array = array.astype(np.uint16)
    elif mode in ("I", "F"):
        raise UnsupportedFormatError(path, f"{mode}-mode (32-bit) PNG is not supported")
    if array.ndim == 2:
        return array[None], False, fmt
    if array.ndim == 3 and array.shape[-1] == 3:
        return np.ascontiguousarray(np.moveaxis(array, -1, 0)), True, fmt
    raise UnsupportedFormatError(path, f"image of shape {array.shape} and mode {mode}")


def open_image(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a PNG or JPEG field of view.

    Parameters
    ----------
    path : str or Path
        The image file.
    mpp : float
        Pixel size in micrometres per pixel; required.

    Returns
    -------
    Slide
        One level, 1024-px Dask chunks over the decoded image.

    Raises
    ------
    MetadataError
        When ``mpp`` is not given.
    InputError
        When the file cannot be decoded or is too large.
    """
    path_str = str(path)
    mpp = check_user_mpp(mpp)
    if mpp is None:
        raise MetadataError(path_str, "PNG/JPEG has no microscope pixel size", hint="pass --mpp")
    image, rgb, fmt = _decode(path_str)
    c, h, w = image.shape
    if h == 0 or w == 0:
        raise InputError(path_str, f"image has no pixels ({h} x {w})")
    data = da.from_array(image, chunks=(c, CHUNK_PX, CHUNK_PX))
    reduce_by = 1
    while max(h, w) / reduce_by > 2048:
        reduce_by *= 2
    thumbnail = data if reduce_by == 1 else block_mean(data, reduce_by)
    names, colors = default_channels(c, rgb=rgb)
    return Slide(
        path=path_str,
        data=data,
        mpp=mpp,
        channel_names=names,
        channel_colors=colors,
        modality=guess_modality(np.asarray(thumbnail)),
        thumbnail=thumbnail,
        thumbnail_downsample=float(reduce_by),
        format_name=fmt,
        level_shapes=((c, h, w),),
    )
