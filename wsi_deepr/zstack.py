"""Training pairs from real z-stacks, prepared as the paper's Methods (Data pre-processing).

One TIFF per field of view (FOV), planes ``(z, y, x)`` or ``(z, c, y, x)``. Per stack:

1. **Registration**: every plane is aligned to a reference plane (the sharpest by default)
   by a sub-pixel translation (the paper's StackReg, translation only):
   scikit-image's ``phase_cross_correlation`` (plain cross-correlation, Hann window,
   light Gaussian pre-smoothing, ``upsample_factor``) and a second pass on the shifted
   plane; planes are moved with ``scipy.ndimage.shift`` (cubic spline). Crops keep clear
   of the border the shifts expose.
2. **Extended depth of field** (EDOF) reference: per pixel, the plane of largest local
   focus measure (Laplacian energy smoothed over ``focus_sigma_px``), the selection masks
   blended with a Gaussian so the composite has no seams. (The paper uses Fiji's complex
   wavelet EDOF, Forster et al. 2004; no Python library ships it, this is the
   "sharpest plane per pixel" family of the same plugin.)
3. **Ground truth**: per non-overlapping crop, the plane with the highest SSIM
   (:func:`wsi_deepr.metrics.ssim`) to the EDOF crop; every plane's defocus is
   ``z_um = (index - gt_index) * z_step_um`` (positive after the ground truth in file
   order).
4. **Pairs**: each plane's crop with the ground-truth crop (the ground truth itself gives
   the z = 0 pair), stored in the bank format of :mod:`wsi_deepr.pairs`; the FOVs are
   split 0.85/0.15 into train and validation (no FOV in both, ranked by
   :func:`wsi_deepr.pairs.split_key`) and the split is written with
   :func:`wsi_deepr.pairs.write_split_manifest`.
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from wsi_deepr import metrics
from wsi_deepr.errors import ConfigError, InputError, MetadataError
from wsi_deepr.pairs import SourceImage, Split, split_key, write_bank, write_split_manifest

LOG = logging.getLogger("wsi_deepr")

F32 = NDArray[np.float32]
BANK_SCALE = 65535.0
"""Banks of z-stack pairs store uint16; 8-bit and 16-bit planes are kept exactly."""
_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}


@dataclass(frozen=True)
class ZStack:
    """One field of view acquired at equally spaced heights."""

    path: str
    """The TIFF file."""
    planes: F32
    """Intensities ``(Z, C, Y, X)`` in [0, 1]."""
    z_step_um: float
    """Axial spacing of the planes (positive)."""
    mpp: float | None = None
    """Lateral pixel size when the file states it."""


@dataclass(frozen=True)
class Crop:
    """One crop of a prepared stack and its ground-truth plane."""

    y0: int
    x0: int
    gt_index: int
    """Plane with the highest SSIM to the EDOF crop."""
    ssim_to_edof: tuple[float, ...]
    """SSIM of every plane's crop to the EDOF crop."""


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register_planes`."""

    registered: F32
    """Registered planes ``(Z, C, Y, X)``."""
    reference_index: int
    """Plane the others were aligned to."""
    shifts_px: NDArray[np.float64]
    """``(Z, 2)``: the (dy, dx) each plane was moved by (zero for the reference)."""
    trusted: NDArray[np.bool_]
    """``(Z,)``: the plane's own estimate was used (else its neighbour's towards the
    reference: too little structure to align)."""


@dataclass(frozen=True)
class PreparedStack:
    """A registered stack, its EDOF reference and its crops."""

    stack: ZStack
    registration: Registration
    edof: F32
    """Extended-depth-of-field image ``(C, Y, X)``."""
    crop_px: int
    crops: tuple[Crop, ...]

    @property
    def registered(self) -> F32:
        """Registered planes ``(Z, C, Y, X)``."""
        return self.registration.registered

    def z_um(self, plane_index: int, crop: Crop) -> float:
        """Defocus of a plane's crop relative to the crop's ground truth."""
        return round((plane_index - crop.gt_index) * self.stack.z_step_um, 6)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: shifts, reference, ground truth per crop."""
        return {
            "file": self.stack.path,
            "planes": int(self.registered.shape[0]),
            "z_step_um": self.stack.z_step_um,
            "mpp": self.stack.mpp,
            "reference_index": self.registration.reference_index,
            "shifts_px": np.round(self.registration.shifts_px, 4).tolist(),
            "shift_trusted": self.registration.trusted.tolist(),
            "crop_px": self.crop_px,
            "crops": [
                {"y0": c.y0, "x0": c.x0, "gt_index": c.gt_index}
                | {"ssim_to_edof": [round(v, 5) for v in c.ssim_to_edof]}
                for c in self.crops
            ],
        }


def _um(value: float, unit: str, path: Path) -> float:
    unit = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    unit = {"microns": "micron", "micrometer": "um", "micrometre": "um"}.get(unit, unit)
    if unit not in _UNIT_TO_UM:
        raise MetadataError(path, f"unknown length unit {unit!r} in the metadata")
    return float(value) * _UNIT_TO_UM[unit]


def _metadata_steps(tif: Any, path: Path) -> tuple[float | None, float | None]:
    """Z step and pixel size (um) from OME or ImageJ metadata, ``None`` where absent."""
    if tif.is_ome and tif.ome_metadata:
        root = ET.fromstring(tif.ome_metadata)
        pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
        if pixels is not None:
            z = pixels.get("PhysicalSizeZ")
            x = pixels.get("PhysicalSizeX")
            z_um = _um(float(z), pixels.get("PhysicalSizeZUnit", "µm"), path) if z else None
            mpp = _um(float(x), pixels.get("PhysicalSizeXUnit", "µm"), path) if x else None
            return z_um, mpp
    meta = tif.imagej_metadata
    if meta and "spacing" in meta:
        unit = str(meta.get("unit", "um"))
        z_um = _um(float(meta["spacing"]), unit, path)
        mpp = None
        tag = tif.pages[0].tags.get("XResolution")
        if tag is not None and tag.value[0]:
            mpp = _um(tag.value[1] / tag.value[0], unit, path)
        return z_um, mpp
    return None, None


def _to_zcyx(arr: NDArray[Any], axes: str, path: Path) -> NDArray[Any]:
    """Planes as ``(Z, C, Y, X)`` from tifffile's axes (or the shape when axes are vague)."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if axes.endswith("S") or (arr.shape[-1] in (3, 4) and arr.shape[1] > 4):
            return np.moveaxis(arr[..., :3], -1, 1)  # (z, y, x, rgb)
        if axes.startswith("CZ"):
            return np.swapaxes(arr, 0, 1)
        return arr
    raise InputError(path, f"expected a (z, y, x) or (z, c, y, x) stack, got shape {arr.shape}")


def read_zstack(path: Path, *, z_step_um: float | None = None) -> ZStack:
    """Read a z-stack TIFF as planes in [0, 1] with its axial spacing.

    Parameters
    ----------
    path : Path
        TIFF (OME, ImageJ or plain) holding ``(z, y, x)``, ``(z, c, y, x)`` or
        ``(z, y, x, rgb)``.
    z_step_um : float, optional
        Axial spacing; overrides the file's metadata, required when the file has none.

    Returns
    -------
    ZStack
        Integer planes divided by their type's maximum (values kept exactly); float planes
        scaled by the stack's maximum.
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = np.asarray(series.asarray())
            meta_z_um, mpp = _metadata_steps(tif, path)
            axes = str(series.axes)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise InputError(path, f"cannot read the z-stack: {exc}") from None
    planes = _to_zcyx(arr, axes, path)
    if planes.shape[0] < 2:
        raise InputError(path, f"a z-stack needs at least 2 planes, got {planes.shape[0]}")
    if z_step_um is None:
        z_step_um = meta_z_um
    elif meta_z_um is not None and not math.isclose(z_step_um, meta_z_um, rel_tol=1e-3):
        LOG.warning("%s: z step %g um given, the file says %g um", path, z_step_um, meta_z_um)
    if z_step_um is None:
        raise MetadataError(path, "no z step in the metadata", hint="give --z-step-um")
    if not z_step_um > 0:
        raise MetadataError(path, f"z step must be positive, got {z_step_um}")
    if np.issubdtype(planes.dtype, np.integer):
        scaled = planes.astype(np.float32) / np.float32(np.iinfo(planes.dtype).max)
    else:
        values = planes.astype(np.float32)
        lo, hi = min(float(values.min()), 0.0), float(values.max())
        scaled = (values - lo) / max(hi - lo, 1e-12)
    return ZStack(str(path), np.clip(scaled, 0.0, 1.0).astype(np.float32), float(z_step_um), mpp)


def focus_measure(plane: NDArray[np.floating], *, sigma_px: float) -> NDArray[np.float64]:
    """Local focus measure of a ``(Y, X)`` plane: Laplacian energy, Gaussian-averaged.

    The Laplacian is taken after a 1-pixel Gaussian (noise) and squared; the average over
    ``sigma_px`` makes it a local measure.
    """
    lap = ndi.gaussian_laplace(np.asarray(plane, dtype=np.float64), 1.0)
    return np.asarray(ndi.gaussian_filter(lap**2, sigma_px))


def sharpest_plane(planes: F32) -> int:
    """Index of the plane with the largest mean focus measure in a ``(Z, C, Y, X)`` stack."""
    grey = planes.mean(axis=1)
    return int(np.argmax([focus_measure(p, sigma_px=1.0).mean() for p in grey]))


def _registration_view(plane: NDArray[np.floating], window: NDArray[np.float64]) -> NDArray[Any]:
    smooth = ndi.gaussian_filter(np.asarray(plane, dtype=np.float64), 1.0)
    return (smooth - smooth.mean()) * window


def register_planes(
    planes: F32,
    *,
    reference_index: int | None = None,
    upsample_factor: int = 100,
    passes: int = 2,
    max_error: float = 0.5,
) -> Registration:
    """Align every plane to a reference plane by a sub-pixel translation.

    Parameters
    ----------
    planes : ndarray of shape (Z, C, Y, X)
        The stack (channels averaged for the estimate, all moved alike).
    reference_index : int, optional
        Plane the others are aligned to; the sharpest (:func:`sharpest_plane`) by default.
    upsample_factor : int
        Sub-pixel precision of the last pass of ``phase_cross_correlation``
        (1/upsample_factor px; earlier passes use 1/10 px).
    passes : int
        Estimates per plane; a second pass on the shifted plane removes the bias of the
        window (the content moves under it).
    max_error : float
        A plane's estimate is trusted when ``phase_cross_correlation``'s normalised error
        (1 - squared correlation coefficient of the peak) is below this. A plane too far
        out of focus to show structure (error near 1) keeps the shift of its neighbour
        towards the reference instead of a shift fitted to noise.

    Returns
    -------
    Registration
    """
    from skimage.filters import window as make_window
    from skimage.registration import phase_cross_correlation

    if reference_index is None:
        reference_index = sharpest_plane(planes)
    n = planes.shape[0]
    if not 0 <= reference_index < n:
        raise ValueError(f"reference plane {reference_index} outside the stack")
    grey = planes.mean(axis=1)
    window = make_window("hann", grey.shape[1:])
    reference = _registration_view(grey[reference_index], window)
    registered = np.empty_like(planes)
    registered[reference_index] = planes[reference_index]
    shifts = np.zeros((n, 2))
    trusted = np.ones(n, dtype=bool)
    outward = [*range(reference_index + 1, n), *range(reference_index - 1, -1, -1)]
    for k in outward:
        total = np.zeros(2)
        for step in range(passes):
            moved = ndi.shift(grey[k], total, order=3, mode="reflect") if step else grey[k]
            estimate, error, _ = phase_cross_correlation(
                reference,
                _registration_view(moved, window),
                # Coarse first passes (cheap); the last one at full precision.
                upsample_factor=upsample_factor if step == passes - 1 else 10,
                normalization=None,
            )
            if step == 0 and not error < max_error:
                trusted[k] = False
                break
            total += estimate
        if not trusted[k]:
            total = shifts[k - 1 if k > reference_index else k + 1].copy()
        shifts[k] = total
        for c in range(planes.shape[1]):
            registered[k, c] = ndi.shift(planes[k, c], total, order=3, mode="reflect")
    return Registration(registered, reference_index, shifts, trusted)


def extended_depth_of_field(
    planes: F32, *, focus_sigma_px: float = 8.0, blend_sigma_px: float = 4.0
) -> F32:
    """EDOF composite of a registered stack: per pixel the sharpest plane, blended.

    Parameters
    ----------
    planes : ndarray of shape (Z, C, Y, X)
        Registered stack.
    focus_sigma_px : float
        Scale of the local focus measure (:func:`focus_measure`).
    blend_sigma_px : float
        Gaussian that softens the per-pixel selection masks (weights still sum to 1).

    Returns
    -------
    ndarray of shape (C, Y, X), float32
    """
    grey = planes.mean(axis=1)
    best = np.full(grey.shape[1:], -np.inf)
    choice = np.zeros(grey.shape[1:], dtype=np.int64)
    for k, plane in enumerate(grey):
        measure = focus_measure(plane, sigma_px=focus_sigma_px)
        better = measure > best
        best[better] = measure[better]
        choice[better] = k
    edof = np.zeros(planes.shape[1:], dtype=np.float64)
    for k in np.unique(choice):
        weight = ndi.gaussian_filter((choice == k).astype(np.float64), blend_sigma_px)
        edof += weight[None] * planes[k]
    return edof.astype(np.float32)


def ground_truth_plane(planes: F32, edof: F32) -> tuple[int, list[float]]:
    """The plane most similar (SSIM) to the EDOF reference, as the paper's ground truth.

    Parameters
    ----------
    planes : ndarray of shape (Z, C, Y, X)
        Registered planes (typically one crop).
    edof : ndarray of shape (C, Y, X)
        The EDOF image of the same region.

    Returns
    -------
    index : int
    ssims : list of float
        SSIM of every plane, on the EDOF's intensity span.
    """
    data_range = max(float(edof.max() - edof.min()), 1e-6)
    ssims = [metrics.ssim(p, edof, data_range=data_range) for p in planes]
    return int(np.argmax(ssims)), ssims


def crop_origins(shape_yx: tuple[int, int], crop_px: int, margin_px: int) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping crops inside a border of ``margin_px``.

    The grid is centred in the usable area; an area smaller than one crop gives none.
    """
    origins = []
    starts = []
    for size in shape_yx:
        usable = size - 2 * margin_px
        n = max(usable // crop_px, 0)
        first = margin_px + (usable - n * crop_px) // 2
        starts.append([first + i * crop_px for i in range(n)])
    for y0 in starts[0]:
        for x0 in starts[1]:
            origins.append((y0, x0))
    return origins


def prepare_stack(
    stack: ZStack,
    *,
    crop_px: int,
    reference_index: int | None = None,
    focus_sigma_px: float = 8.0,
) -> PreparedStack:
    """Register a stack, build its EDOF reference and find the ground truth per crop.

    Parameters
    ----------
    stack : ZStack
        The field of view.
    crop_px : int
        Edge of the non-overlapping crops.
    reference_index : int, optional
        Registration reference; the sharpest plane by default.
    focus_sigma_px : float
        Scale of the EDOF's local focus measure.

    Returns
    -------
    PreparedStack
    """
    reg = register_planes(stack.planes, reference_index=reference_index)
    registered, shifts = reg.registered, reg.shifts_px
    edof = extended_depth_of_field(registered, focus_sigma_px=focus_sigma_px)
    # Keep clear of the border that the shifts filled by reflection.
    margin_px = math.ceil(float(np.abs(shifts).max(initial=0.0)))
    origins = crop_origins(registered.shape[2:], crop_px, margin_px)
    if not origins:
        raise InputError(
            stack.path,
            f"planes of {registered.shape[2]}x{registered.shape[3]} px hold no {crop_px} px "
            f"crop inside the {margin_px} px border of the registration shifts",
        )
    crops = []
    for y0, x0 in origins:
        window = (slice(None), slice(None), slice(y0, y0 + crop_px), slice(x0, x0 + crop_px))
        gt, ssims = ground_truth_plane(registered[window], edof[window[1:]])
        crops.append(Crop(y0, x0, gt, tuple(ssims)))
    return PreparedStack(stack, reg, edof, crop_px, tuple(crops))


@dataclass(frozen=True)
class _PairRows:
    """Pairs cut from prepared stacks, before they are written to a bank."""

    inputs: list[NDArray[np.uint16]]
    targets: list[NDArray[np.uint16]]
    z_um: list[float]
    plane_index: list[int]
    gt_index: list[int]
    crop_yx: list[tuple[int, int]]
    source_index: list[int]


def stack_pairs(
    prepared: PreparedStack, *, max_defocus_um: float | None = None
) -> list[tuple[F32, F32, float, int, Crop]]:
    """Every plane's crop with the ground-truth crop: ``(input, target, z_um, plane, crop)``.

    Parameters
    ----------
    prepared : PreparedStack
        Output of :func:`prepare_stack`.
    max_defocus_um : float, optional
        Keep planes with ``|z_um|`` up to this (the training range); all by default.

    Returns
    -------
    list of tuple
        The z = 0 pair (ground truth with itself) included.
    """
    out = []
    n = prepared.crop_px
    for crop in prepared.crops:
        sl = (slice(None), slice(crop.y0, crop.y0 + n), slice(crop.x0, crop.x0 + n))
        target = prepared.registered[crop.gt_index][sl]
        for k in range(prepared.registered.shape[0]):
            z_um = prepared.z_um(k, crop)
            if max_defocus_um is not None and abs(z_um) > max_defocus_um + 1e-9:
                continue
            out.append((prepared.registered[k][sl], target, z_um, k, crop))
    return out


def split_fovs(sources: list[SourceImage], *, val_fraction: float = 0.15) -> dict[str, Split]:
    """Assign whole fields of view to train or validation (paper: 0.85/0.15).

    FOVs are ranked by :func:`wsi_deepr.pairs.split_key` (a hash of the file name, so the
    choice is stable) and the ``round(val_fraction * n)`` first (at least one) go to
    validation.

    Parameters
    ----------
    sources : list of SourceImage
        One per FOV, file names unique.
    val_fraction : float
        Share of FOVs for validation.

    Returns
    -------
    dict
        File name -> ``"train"`` or ``"val"``.
    """
    names = [Path(s.path).name for s in sources]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(dup[0], "two z-stacks share this file name (FOVs are split by name)")
    if len(sources) < 2:
        raise ConfigError(
            sources[0].path if sources else "z-stacks",
            "a train/validation split by field of view needs at least 2 stacks",
        )
    n_val = min(max(round(val_fraction * len(sources)), 1), len(sources) - 1)
    ranked = sorted(sources, key=split_key)
    val = {Path(s.path).name for s in ranked[:n_val]}
    return {name: ("val" if name in val else "train") for name in names}


@dataclass(frozen=True)
class ZStackBanks:
    """What :func:`build_zstack_banks` wrote."""

    train: Path
    val: Path
    manifest: Path
    report: Path
    counts: dict[str, int]
    """Pairs per split."""


def build_zstack_banks(
    paths: list[Path],
    out_dir: Path,
    *,
    crop_px: int = 256,
    z_step_um: float | None = None,
    max_defocus_um: float | None = None,
    val_fraction: float = 0.15,
    dataset: str | None = None,
) -> ZStackBanks:
    """Prepare z-stacks and write train and validation banks, split manifest and report.

    Parameters
    ----------
    paths : list of Path
        One stack per field of view.
    out_dir : Path
        Gets ``train.npz``, ``val.npz`` (:class:`wsi_deepr.pairs.PairBank` format),
        ``splits.json`` and ``zstack_report.json`` (shifts, ground truth per crop).
    crop_px : int
        Edge of the crops (paper: 512).
    z_step_um : float, optional
        Axial spacing for stacks without it in their metadata (overrides metadata).
    max_defocus_um : float, optional
        Training range: pairs with larger ``|z_um|`` are left out.
    val_fraction : float
        Share of FOVs for validation.
    dataset : str, optional
        Data set name recorded with each source (default: the stacks' folder name).

    Returns
    -------
    ZStackBanks
    """
    sources = [SourceImage(str(p), dataset or f"zstack/{Path(p).parent.name}") for p in paths]
    assignment = split_fovs(sources, val_fraction=val_fraction)
    rows = {s: _PairRows([], [], [], [], [], [], []) for s in ("train", "val")}
    chosen: dict[str, list[str]] = {"train": [], "val": []}
    report: list[dict[str, Any]] = []
    channels: set[int] = set()
    for source in sources:
        fov_split = assignment[Path(source.path).name]
        prepared = prepare_stack(
            read_zstack(Path(source.path), z_step_um=z_step_um), crop_px=crop_px
        )
        channels.add(prepared.registered.shape[1])
        if len(channels) > 1:
            raise InputError(source.path, "channel count differs from the other stacks")
        bucket = rows[fov_split]
        index = len(chosen[fov_split])
        chosen[fov_split].append(source.path)
        for x, y, z_um, k, crop in stack_pairs(prepared, max_defocus_um=max_defocus_um):
            bucket.inputs.append(_quantise(x))
            bucket.targets.append(_quantise(y))
            bucket.z_um.append(z_um)
            bucket.plane_index.append(k)
            bucket.gt_index.append(crop.gt_index)
            bucket.crop_yx.append((crop.y0, crop.x0))
            bucket.source_index.append(index)
        report.append(prepared.summary() | {"split": fov_split})
        reg = prepared.registration
        LOG.info(
            "%s: %s, reference plane %d, max shift %.2f px, %d of %d planes aligned on "
            "their own, %d crops",
            source.path,
            fov_split,
            reg.reference_index,
            float(np.abs(reg.shifts_px).max()),
            int(reg.trusted.sum()),
            len(reg.trusted),
            len(prepared.crops),
        )
    settings = {
        "kind": "zstack",
        "crop_px": crop_px,
        "z_step_um": z_step_um,
        "max_defocus_um": max_defocus_um,
        "val_fraction": val_fraction,
        "registration": "skimage phase_cross_correlation (plain, Hann, 2 passes), spline",
        "edof": "sharpest plane per pixel (Laplacian energy), Gaussian-blended",
        "ground_truth": "highest SSIM to the EDOF crop",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, bucket in rows.items():
        if not bucket.inputs:
            raise InputError(out_dir, f"no {split} pairs (stacks too small or range too narrow)")
        mpp = [r["mpp"] for r in report if r["split"] == split]
        meta = np.full((len(bucket.z_um), 4), np.nan, dtype=np.float32)
        meta[:, 0] = bucket.z_um
        meta[:, 1] = [mpp[i] if mpp[i] is not None else np.nan for i in bucket.source_index]
        written[split] = write_bank(
            out_dir / f"{split}.npz",
            inputs=np.stack(bucket.inputs),
            targets=np.stack(bucket.targets),
            meta=meta,
            source_index=np.asarray(bucket.source_index, dtype=np.int32),
            sources=chosen[split],
            settings=settings,
            scale=BANK_SCALE,
            z_um=np.asarray(bucket.z_um, dtype=np.float32),
            plane_index=np.asarray(bucket.plane_index, dtype=np.int32),
            gt_index=np.asarray(bucket.gt_index, dtype=np.int32),
            crop_yx=np.asarray(bucket.crop_yx, dtype=np.int32),
        )
    manifest = out_dir / "splits.json"
    write_split_manifest(sources, manifest, split=lambda s: assignment[Path(s.path).name])
    report_path = out_dir / "zstack_report.json"
    report_path.write_text(json.dumps({"settings": settings, "stacks": report}, indent=1))
    return ZStackBanks(
        written["train"],
        written["val"],
        manifest,
        report_path,
        {split: len(bucket.z_um) for split, bucket in rows.items()},
    )


def _quantise(image: F32) -> NDArray[np.uint16]:
    return np.clip(np.rint(image * BANK_SCALE), 0, BANK_SCALE).astype(np.uint16)
