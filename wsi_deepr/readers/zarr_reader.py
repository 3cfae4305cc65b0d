"""OME-Zarr images (NGFF 0.4 on zarr 2, 0.5 on zarr 3), local or at an fsspec URL.

Read with zarr-python 3 directly: the ``multiscales`` block names the levels and axes,
its ``scale`` transformations give the pixel size, ``omero`` the channel names and colours.
Pixels are read one stored chunk per call: when a chunk fails to decode, zarr 3.1 leaves
the sibling reads of a multi-chunk call pending and they print tracebacks at exit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_deepr.errors import InputError, MetadataError, UnsupportedFormatError
from wsi_deepr.readers.base import (
    RegionSource,
    default_channels,
    guess_modality,
    lazy_level,
    pick_thumbnail,
    resolve_mpp,
    sample_for_modality,
)
from wsi_deepr.slide import Slide

LOG = logging.getLogger("wsi_deepr")

SUPPORTED_VERSIONS = ("0.4", "0.5")
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    ZeroDivisionError,
    OverflowError,
    OSError,
    NotImplementedError,
)
"""What zarr and JSON parsing raise on malformed stores."""
_UNIT_TO_UM = {
    None: 1.0,  # NGFF units are optional; micrometres is what every writer we know means
    "micrometer": 1.0,
    "nanometer": 1e-3,
    "angstrom": 1e-4,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}
_SUPPORTED_DTYPES = frozenset(
    np.dtype(t) for t in ("uint8", "uint16", "int16", "uint32", "float32", "float64")
)


class ZarrLevelSource(RegionSource):
    """One multiscale level; pickles as its zarr array (store and path)."""

    def __init__(
        self, path: str, array: Any, axes: list[str], label: str, shape: tuple[int, int, int]
    ) -> None:
        self.path = path
        self.array = array
        self.axes = axes
        self.label = label
        self.shape = shape
        self.dtype = np.dtype(array.dtype)
        self._order = [axes.index(a) for a in ("c", "y", "x") if a in axes]

    def _selection(self, y0: int, y1: int, x0: int, x1: int) -> tuple[Any, ...]:
        parts: list[Any] = []
        for name in self.axes:
            parts.append({"y": slice(y0, y1), "x": slice(x0, x1), "c": slice(None)}.get(name, 0))
        return tuple(parts)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read rows ``y0:y1`` and columns ``x0:x1`` as ``(c, h, w)``, a chunk at a time."""
        out = np.empty((self.shape[0], y1 - y0, x1 - x0), self.dtype)
        chunks = self.array.chunks
        cy = chunks[self.axes.index("y")]
        cx = chunks[self.axes.index("x")]
        for ty in range(y0 // cy, (y1 - 1) // cy + 1):
            for tx in range(x0 // cx, (x1 - 1) // cx + 1):
                ry0, ry1 = max(y0, ty * cy), min(y1, (ty + 1) * cy)
                rx0, rx1 = max(x0, tx * cx), min(x1, (tx + 1) * cx)
                block = np.asarray(self.array[self._selection(ry0, ry1, rx0, rx1)])
                kept = [a for a in self.axes if a in ("c", "y", "x")]
                block = np.transpose(block, [kept.index(a) for a in ("c", "y", "x") if a in kept])
                if "c" not in kept:
                    block = block[None]
                out[:, ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = block
        return out


def _multiscales(path: str, attrs: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """NGFF version, first multiscale and the omero block, whatever the version's layout."""
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        ome = attrs["ome"]
        version = str(ome.get("version", "?"))
        multiscales = ome.get("multiscales")
        omero = ome.get("omero") or {}
    else:
        multiscales = attrs.get("multiscales")
        omero = attrs.get("omero") or {}
        first = multiscales[0] if isinstance(multiscales, list) and multiscales else {}
        version = str(first.get("version", "?")) if isinstance(first, dict) else "?"
    if not isinstance(multiscales, list) or not multiscales:
        raise UnsupportedFormatError(path, "Zarr store without OME-NGFF multiscales metadata")
    if version not in SUPPORTED_VERSIONS:
        raise MetadataError(
            path, f"OME-NGFF version {version!r} is not supported (0.4 and 0.5 are)"
        )
    ms = multiscales[0]
    if not isinstance(ms, dict):
        raise MetadataError(path, "multiscales entry is not an object")
    return version, ms, omero if isinstance(omero, dict) else {}


def _scale(path: str, transforms: Any, ndim: int, where: str) -> list[float]:
    """The ``scale`` vector of a list of coordinate transformations (ones if absent)."""
    if transforms is None:
        return [1.0] * ndim
    for item in transforms if isinstance(transforms, list) else []:
        if isinstance(item, dict) and item.get("type") == "scale":
            scale = item.get("scale")
            if not isinstance(scale, list) or len(scale) != ndim:
                raise MetadataError(path, f"{where}: scale {scale!r} does not have {ndim} values")
            try:
                return [float(v) for v in scale]
            except (TypeError, ValueError) as exc:
                raise MetadataError(path, f"{where}: scale {scale!r} is not numeric") from exc
    return [1.0] * ndim


def _axes(path: str, ms: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Axis names (lower case) and the axis dicts by name."""
    raw = ms.get("axes")
    if not isinstance(raw, list) or not raw:
        raise MetadataError(path, "multiscales has no axes")
    names: list[str] = []
    by_name: dict[str, Any] = {}
    for axis in raw:
        name = axis.get("name") if isinstance(axis, dict) else axis
        if not isinstance(name, str):
            raise MetadataError(path, f"axis {axis!r} has no name")
        names.append(name.lower())
        by_name[name.lower()] = axis if isinstance(axis, dict) else {"name": name}
    if "y" not in names or "x" not in names:
        raise UnsupportedFormatError(path, f"axes {names} have no y and x")
    unknown = set(names) - {"t", "c", "z", "y", "x"}
    if unknown or len(set(names)) != len(names):
        raise UnsupportedFormatError(path, f"axes {names} are not a t, c, z, y, x subset")
    return names, by_name


def _hex_color(value: Any, default: str) -> str:
    """An ``RRGGBB`` colour from omero metadata, or the default when it is not one."""
    text = str(value).upper() if isinstance(value, str) else ""
    if len(text) == 6 and all(ch in "0123456789ABCDEF" for ch in text):
        return text
    return default


def _check_level_scales(path: str, sources: list[ZarrLevelSource], x_scales: list[float]) -> None:
    """Each level's x scale must grow as its width shrinks (within 10 %)."""
    w0, s0 = sources[0].shape[2], x_scales[0]
    for source, scale in zip(sources[1:], x_scales[1:], strict=True):
        if not (s0 > 0 and scale > 0 and math.isfinite(scale)):
            continue  # level 0's own scale is judged as the pixel size
        by_shape, by_scale = w0 / source.shape[2], scale / s0
        if abs(by_scale - by_shape) > 0.1 * by_shape:
            raise MetadataError(
                path,
                f"level {source.label!r} is {by_shape:.3g}x smaller than level 0 but its "
                f"scale says {by_scale:.3g}x",
            )


def open_ome_zarr(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open an OME-Zarr image lazily.

    Parameters
    ----------
    path : str or Path
        Store directory or fsspec URL (``s3://...``, ``https://...``).
    mpp : float, optional
        Pixel size in micrometres per pixel; overrides the ``scale`` of level 0.

    Returns
    -------
    Slide
        Level 0 with 1024-px Dask chunks, the thumbnail from a stored level.

    Raises
    ------
    InputError
        Missing store or level, unsupported axes or version, metadata contradicting the
        arrays (each a subclass naming the problem).
    """
    path_str = str(path)
    try:
        return _open_ome_zarr(path_str, mpp)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise InputError(path_str, "no Zarr group here") from exc
    except _MALFORMED as exc:
        # zarr validates metadata documents lazily and fails in many ways
        raise InputError(
            path_str, f"malformed Zarr metadata ({type(exc).__name__}: {exc})"
        ) from exc


def _open_ome_zarr(path_str: str, mpp: float | None) -> Slide:
    try:
        group = zarr.open_group(path_str, mode="r")
        attrs = group.attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise InputError(path_str, "no Zarr group here") from exc
    except (*_MALFORMED, ImportError) as exc:
        raise InputError(path_str, f"cannot open the store ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # remote backends (s3fs, gcsfs, aiohttp) raise their own types
        raise InputError(path_str, f"cannot open the store ({type(exc).__name__}: {exc})") from exc
    version, ms, omero = _multiscales(path_str, attrs)
    axes, axis_info = _axes(path_str, ms)
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise MetadataError(path_str, "multiscales lists no datasets (levels)")
    outer = _scale(path_str, ms.get("coordinateTransformations"), len(axes), "multiscales")

    sources: list[ZarrLevelSource] = []
    scales: list[list[float]] = []
    for k, dataset in enumerate(datasets):
        level_path = dataset.get("path") if isinstance(dataset, dict) else None
        if not isinstance(level_path, str):
            raise MetadataError(path_str, f"dataset {k} has no path")
        try:
            array = group[level_path]
        except KeyError as exc:
            raise MetadataError(
                path_str, f"level {level_path!r} listed in the metadata is missing"
            ) from exc
        except Exception as exc:  # as above: local and remote stores fail in many ways
            raise InputError(
                path_str, f"level {level_path!r} cannot be opened ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(array, zarr.Array):
            raise MetadataError(path_str, f"level {level_path!r} is a group, not an array")
        if array.ndim != len(axes):
            raise MetadataError(
                path_str,
                f"level {level_path!r} has {array.ndim} dimensions but the axes are {axes}",
            )
        if np.dtype(array.dtype) not in _SUPPORTED_DTYPES:
            raise UnsupportedFormatError(path_str, f"pixel type {array.dtype} is not supported")
        shape = dict(zip(axes, (int(n) for n in array.shape), strict=True))
        for extra in ("t", "z"):
            if shape.get(extra, 1) > 1:
                LOG.warning(
                    "%s: %s axis of size %d; reading index 0", path_str, extra, shape[extra]
                )
        cyx = (shape.get("c", 1), shape["y"], shape["x"])
        if 0 in cyx:
            raise InputError(path_str, f"level {level_path!r} has no pixels (shape {array.shape})")
        if sources:
            prev = sources[-1].shape
            if cyx[0] != prev[0] or cyx[1] > prev[1] or cyx[2] > prev[2]:
                raise MetadataError(
                    path_str,
                    f"level {level_path!r} shape {cyx} does not follow level "
                    f"{sources[-1].label!r} {prev} (channels differ or size grows)",
                )
            if array.dtype != sources[0].dtype:
                raise MetadataError(path_str, f"level {level_path!r} has another dtype")
        level_scale = _scale(
            path_str, dataset.get("coordinateTransformations"), len(axes), level_path
        )
        scales.append([a * b for a, b in zip(level_scale, outer, strict=True)])
        sources.append(ZarrLevelSource(path_str, array, axes, level_path, cyx))

    unit = axis_info["x"].get("unit")
    factor = _UNIT_TO_UM.get(unit)
    if factor is None:
        raise MetadataError(path_str, f"x axis unit {unit!r} is not a length unit")
    file_mpp: float | None = scales[0][axes.index("x")] * factor
    y_mpp = scales[0][axes.index("y")] * _UNIT_TO_UM.get(axis_info["y"].get("unit"), 1.0)
    if (
        file_mpp is not None
        and math.isfinite(file_mpp)
        and abs(y_mpp - file_mpp) > 0.01 * abs(file_mpp)
    ):
        LOG.warning("%s: pixels are not square (%g x %g um); using x", path_str, file_mpp, y_mpp)
    if not any(isinstance(d, dict) and d.get("coordinateTransformations") for d in datasets):
        file_mpp = None  # no scale anywhere: the pixel size is unknown, not 1 um
    else:
        _check_level_scales(path_str, sources, [sc[axes.index("x")] for sc in scales])
    slide_mpp = resolve_mpp(path_str, file_mpp, mpp)

    levels = [lazy_level(src) for src in sources]
    h0, w0 = sources[0].shape[1:]
    downsamples = [0.5 * (h0 / s.shape[1] + w0 / s.shape[2]) for s in sources]
    thumbnail, thumb_ds, stored = pick_thumbnail(levels, downsamples)

    n_channels = sources[0].shape[0]
    channels = omero.get("channels") if isinstance(omero.get("channels"), list) else None
    if channels is not None and not all(isinstance(ch, dict) for ch in channels):
        LOG.warning("%s: omero channels are not objects; using default names", path_str)
        channels = None
    rgb_like = n_channels == 3 and sources[0].dtype == np.uint8
    names, colors = default_channels(n_channels, rgb=rgb_like)
    if channels is not None and len(channels) == n_channels:
        names = tuple(str(ch.get("label") or n) for ch, n in zip(channels, names, strict=True))
        colors = tuple(
            _hex_color(ch.get("color"), c) for ch, c in zip(channels, colors, strict=True)
        )
    elif channels is not None:
        LOG.warning(
            "%s: omero lists %d channels, the arrays have %d; using default names",
            path_str,
            len(channels),
            n_channels,
        )
    modality = guess_modality(sample_for_modality(levels[0], thumbnail, stored=stored))
    return Slide(
        path=path_str,
        data=levels[0],
        mpp=slide_mpp,
        channel_names=names,
        channel_colors=colors,
        modality=modality,
        thumbnail=thumbnail,
        thumbnail_downsample=thumb_ds,
        format_name=f"ome-zarr:{version}",
        level_shapes=tuple(s.shape for s in sources),
    )
