"""Slide readers behind one function, :func:`open_slide`.

One module per format family; each returns a :class:`~wsi_deepr.slide.Slide` whose
level 0 is a lazy Dask array ``(c, y, x)`` read a chunk at a time.

Examples
--------
>>> from wsi_deepr.readers import open_slide
>>> slide = open_slide("CMU-1-Small-Region.svs")  # doctest: +SKIP
>>> slide.shape_yx, slide.mpp  # doctest: +SKIP
((2967, 2220), 0.499)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from wsi_deepr.errors import InputError, UnsupportedFormatError
from wsi_deepr.readers.base import check_user_mpp
from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")

__all__ = ["detect_format", "open_slide"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "file://")


def _is_url(path: str) -> bool:
    return path.startswith(_URL_SCHEMES) or "::" in path


def detect_format(path: str | Path) -> str:
    """Which reader handles a file: ``"zarr"``, ``"openslide"``, ``"tiff"`` or ``"image"``.

    Decided by content (magic bytes, OpenSlide's own detection), not by the extension.

    Parameters
    ----------
    path : str or Path
        File, store directory or URL.

    Returns
    -------
    str
        The reader family.

    Raises
    ------
    InputError
        When the path does not exist, is empty or unreadable.
    UnsupportedFormatError
        When no reader recognises it.
    """
    path_str = str(path)
    if _is_url(path_str):
        return "zarr"
    if not os.path.exists(path_str):
        raise InputError(path_str, "no such file or directory")
    if os.path.isdir(path_str):
        if any(
            os.path.exists(os.path.join(path_str, name))
            for name in ("zarr.json", ".zgroup", ".zattrs", ".zarray")
        ):
            return "zarr"
        raise UnsupportedFormatError(path_str, "a folder that is not a Zarr store")
    if not os.path.isfile(path_str):
        # Opening a named pipe would wait for a writer forever; devices are no slides.
        raise UnsupportedFormatError(path_str, "not a regular file (a pipe, socket or device)")
    try:
        with open(path_str, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InputError(path_str, f"cannot read the file: {exc.strerror or exc}") from exc
    if not head:
        raise InputError(path_str, "the file is empty")

    from wsi_deepr.readers.openslide_reader import detect_vendor

    vendor = detect_vendor(path_str)
    # OpenSlide's generic-TIFF reader sees neither SubIFD pyramids nor non-RGB pixels;
    # tifffile reads both, so plain and OME TIFFs go there.
    if vendor is not None and vendor != "generic-tiff":
        return "openslide"
    if head.startswith(_TIFF_MAGIC):
        return "tiff"
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        return "image"
    raise UnsupportedFormatError(
        path_str,
        "not a slide format wsi-deepr reads (SVS, NDPI, MRXS, SCN, TIFF, OME-TIFF, "
        "OME-Zarr, PNG, JPEG)",
    )


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide, image or OME-Zarr store lazily.

    Parameters
    ----------
    path : str or Path
        A file (SVS, NDPI, MRXS, SCN, TIFF, OME-TIFF, PNG, JPEG), an OME-Zarr store
        directory or an fsspec URL of one.
    mpp : float, optional
        Pixel size in micrometres per pixel. Overrides the file's; required when the file
        has none (PNG, JPEG, TIFFs without resolution tags).

    Returns
    -------
    Slide
        Level 0 as a Dask array ``(c, y, x)`` with 1024 x 1024 chunks, nothing read yet
        beyond metadata and a small view to judge the background.

    Raises
    ------
    InputError
        Any problem with the input (a subclass names which), with the path in the message.
    OptionError
        When ``mpp`` is not a credible pixel size.
    """
    check_user_mpp(mpp)
    kind = detect_format(path)
    LOG.debug("%s: reading with the %s reader", path, kind)
    if kind == "openslide":
        from wsi_deepr.readers.openslide_reader import open_openslide

        return open_openslide(path, mpp=mpp)
    if kind == "tiff":
        from wsi_deepr.readers.tiff_reader import open_tiff

        return open_tiff(path, mpp=mpp)
    if kind == "zarr":
        from wsi_deepr.readers.zarr_reader import open_ome_zarr

        return open_ome_zarr(path, mpp=mpp)
    from wsi_deepr.readers.image_reader import open_image

    return open_image(path, mpp=mpp)
