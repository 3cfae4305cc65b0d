"""Reading a rectangle of one TIFF page: only the tiles or strips it touches.

Compressed tiles and strips are decoded with tifffile's own decoders; uncompressed strips
are read row by row (tifffile writes big plain TIFFs as a single strip). All reads go
through the file handle's lock, so Dask threads can share one handle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tifffile

from wsi_deepr.errors import InputError, UnsupportedFormatError

MAX_SEGMENT_BYTES = 1 << 30
"""Largest decoded tile or strip accepted; beyond it the file is corrupt or unusable."""


def segment_grid(kf: Any) -> tuple[int, int, int, int, int]:
    """``(planes, segment_rows, segment_cols, n_rows, n_cols)`` of a page's tiles or strips."""
    h, w = int(kf.imagelength), int(kf.imagewidth)
    planes = int(kf.samplesperpixel) if kf.planarconfig == 2 else 1
    if kf.is_tiled:
        th, tw = int(kf.tilelength), int(kf.tilewidth)
    else:
        th, tw = min(int(kf.rowsperstrip) or h, h), w
    if th <= 0 or tw <= 0:
        raise ValueError(f"tile or strip size {th} x {tw}")
    segment_bytes = th * tw * int(kf.samplesperpixel) * max(1, int(kf.bitspersample) // 8)
    if segment_bytes > MAX_SEGMENT_BYTES and not raw_strips(kf):
        raise ValueError(f"one tile or strip would take {segment_bytes} bytes (limit 1 GiB)")
    return planes, th, tw, -(-h // th), -(-w // tw)


def raw_strips(kf: Any) -> bool:
    """Uncompressed, byte-aligned strips: rows can be read directly, a few at a time.

    tifffile writes uncompressed images as one strip by default, so a big plain TIFF
    would otherwise be decoded whole for every chunk.
    """
    return bool(
        not kf.is_tiled
        and kf.compression == 1
        and kf.predictor == 1
        and kf.fillorder == 1
        and kf.bitspersample in (8, 16, 32, 64)
        and kf.dtype is not None
        and kf.photometric != tifffile.PHOTOMETRIC.YCBCR  # may be subsampled
    )


def read_raw_rows(
    path: str, tif: tifffile.TiffFile, page: Any, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Read ``box`` from uncompressed strips by seeking to its rows; ``(s, h, w)``."""
    y0, y1, x0, x1 = box
    kf = page.keyframe
    planar = kf.planarconfig == 2
    planes, rows_per_strip, _, n_strips, _ = segment_grid(kf)
    contig = 1 if planar else int(kf.samplesperpixel)
    dtype = np.dtype(kf.dtype).newbyteorder(tif.byteorder)
    row_bytes = int(kf.imagewidth) * contig * dtype.itemsize
    out = np.empty((planes * contig, y1 - y0, x1 - x0), kf.dtype)
    fh = tif.filehandle
    for plane in range(planes):
        for strip in range(y0 // rows_per_strip, (y1 - 1) // rows_per_strip + 1):
            index = plane * n_strips + strip
            first = strip * rows_per_strip
            r0, r1 = max(y0, first), min(y1, first + rows_per_strip)
            start, length = (r0 - first) * row_bytes, (r1 - r0) * row_bytes
            if start + length > int(page.databytecounts[index]):
                raise InputError(path, f"strip {index} is shorter than its rows (corrupt file)")
            with fh.lock:
                fh.seek(int(page.dataoffsets[index]) + start)
                data = fh.read(length)
            if len(data) != length:
                raise InputError(path, f"strip {index} ends early (truncated file)")
            rows = np.frombuffer(data, dtype).reshape(r1 - r0, -1, contig)[:, x0:x1]
            c0 = plane if planar else 0
            out[c0 : c0 + contig, r0 - y0 : r1 - y0] = np.moveaxis(rows, -1, 0)
    return out


def check_offsets(path: str, pages: list[Any], file_size: int) -> None:
    """Fail early when tile or strip data are missing or lie beyond the end of the file."""
    for page in pages:
        offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
        counts = np.asarray(page.databytecounts, dtype=np.uint64)
        planes, _, _, ny, nx = segment_grid(page.keyframe)
        if offsets.size != counts.size or offsets.size < planes * ny * nx:
            raise InputError(
                path,
                f"TIFF page lists {offsets.size} tile offsets and {counts.size} byte counts "
                f"for {planes * ny * nx} tiles (corrupt file)",
            )
        end = int((offsets + counts).max())
        if end > file_size:
            raise InputError(
                path,
                f"pixel data end at byte {end} but the file has {file_size} bytes "
                "(truncated or corrupt TIFF)",
            )


def read_page_region(
    path: str, tif: tifffile.TiffFile, page: Any, samples: int, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Decode the tiles or strips of one page that overlap ``box`` into ``(s, h, w)``."""
    kf = page.keyframe
    if raw_strips(kf):
        return read_raw_rows(path, tif, page, box)[:samples]
    y0, y1, x0, x1 = box
    planar = kf.planarconfig == 2
    if kf.is_tiled and kf.tiledepth > 1:
        raise UnsupportedFormatError(path, "volumetric TIFF tiles are not supported")
    planes, th, tw, ny, nx = segment_grid(kf)
    out = np.zeros(
        (planes * (1 if planar else int(kf.samplesperpixel)), y1 - y0, x1 - x0), kf.dtype
    )
    decode = kf.decode
    fh = tif.filehandle
    offsets, counts = page.dataoffsets, page.databytecounts
    for plane in range(planes):
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = plane * ny * nx + ty * nx + tx
                if counts[index] == 0:
                    continue  # empty tile: TIFF readers show it as zeros
                with fh.lock:
                    fh.seek(offsets[index])
                    data = fh.read(counts[index])
                segment, _, _ = decode(
                    data,
                    index,
                    jpegtables=page.jpegtables,
                    jpegheader=kf.jpegheader,
                    _fullsize=kf.is_tiled,
                )
                if segment is None:
                    continue
                seg = segment[0]  # (rows, cols, s)
                ty0, tx0 = ty * th, tx * tw
                sy0, sy1 = max(y0, ty0), min(y1, ty0 + seg.shape[0])
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + seg.shape[1])
                if sy1 <= sy0 or sx1 <= sx0:
                    continue
                c0 = plane if planar else 0
                part = seg[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
                # one channel at a time: 2.3x faster than one copy of the moved axes
                for k in range(seg.shape[2]):
                    out[c0 + k, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = part[..., k]
    return out[:samples]
