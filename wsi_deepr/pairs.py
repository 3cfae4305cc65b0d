"""Training pairs (defocused input, in-focus target) simulated from real in-focus images.

The sources are real in-focus images (``shared/data/he`` for brightfield H&E,
``shared/data/fluo`` for fluorescence). Each source file is one field of view (FOV) and
goes, whole, into exactly one split (train / val / test), decided by a hash of its name,
so evaluation never sees an image that training saw. The split is written to a manifest.

A pair is made by cutting a region (crop plus a margin for the blur) from a source, drawing
defocus ``z`` uniformly within the training range and the pixel size within the model's
mpp range, blurring with :mod:`wsi_deepr.physics` in linear intensity (sRGB decoded for
brightfield), adding Poisson-Gaussian noise and, for brightfield, JPEG compression, and
cropping the centre. Simulating is slow, so pairs are built once into a bank (``.npz``)
and reused by every training run.

Real z-stacks are prepared by :mod:`wsi_deepr.zstack` and give pairs of the same form.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_deepr import physics
from wsi_deepr.errors import ConfigError

LOG = logging.getLogger("wsi_deepr")

Split = Literal["train", "val", "test"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


@dataclass(frozen=True, slots=True)
class SourceImage:
    """One real in-focus field of view."""

    path: str
    """File path."""
    dataset: str
    """Name of the data set folder (recorded in the model card with its licence)."""


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    """How defocused inputs are simulated from in-focus targets."""

    modality: Literal["brightfield", "fluorescence"]
    defocus_range_um: tuple[float, float]
    """Defocus is drawn uniformly in this range (micrometres)."""
    na: float
    """Objective numerical aperture."""
    mpp_range: tuple[float, float]
    """Pixel size drawn uniformly in this range (micrometres per pixel)."""
    immersion_index: float = 1.0
    spherical_waves_max: float = 0.3
    """Primary spherical aberration drawn uniformly in +/- this (waves)."""
    na_jitter: float = 0.03
    """NA drawn uniformly in ``na +/- na_jitter`` (objectives differ)."""
    emission_um_range: tuple[float, float] = (0.45, 0.65)
    """Fluorescence emission wavelength range."""
    photons_range: tuple[float, float] = (200.0, 5000.0)
    """Photo-electrons at intensity 1, drawn log-uniformly."""
    read_noise_e: float = 2.0
    jpeg_quality_range: tuple[int, int] = (70, 95)
    """JPEG quality for brightfield inputs (scanners store JPEG)."""
    in_focus_fraction: float = 0.1
    """Fraction of pairs at z = 0, so in-focus inputs are left unharmed."""
    colour_jitter: float = 0.1
    """Brightfield stain variation: optical density scaled by 1 +/- this per channel."""
    condenser_na_range: tuple[float, float] | None = None
    """Brightfield only: Köhler condenser NA drawn uniformly in this range per pair (capped
    at the pair's NA), for the partially coherent model of :mod:`wsi_deepr.physics`.
    ``None``: the incoherent PSF."""

    def __post_init__(self) -> None:
        if self.condenser_na_range is not None:
            lo, hi = self.condenser_na_range
            if self.modality != "brightfield":
                raise ValueError("condenser_na_range applies to brightfield only")
            if not 0 < lo <= hi:
                raise ValueError(
                    f"condenser_na_range {self.condenser_na_range} must be 0 < lo <= hi"
                )

    @classmethod
    def from_dict(cls, modality: str, values: dict[str, Any]) -> SimulationSettings:
        """Settings from a config's ``simulation`` block (lists become tuples).

        Raises
        ------
        TypeError
            Unknown or missing keys, or an invalid ``condenser_na_range``.
        """
        sim = dict(values)
        for key in (
            "defocus_range_um",
            "mpp_range",
            "emission_um_range",
            "photons_range",
            "jpeg_quality_range",
            "condenser_na_range",
        ):
            if sim.get(key) is not None:
                sim[key] = tuple(sim[key])
        try:
            return cls(modality=modality, **sim)  # type: ignore[arg-type]
        except ValueError as exc:  # the callers report TypeError as a config error
            raise TypeError(str(exc)) from None


def list_sources(data_dir: Path, modality: str) -> list[SourceImage]:
    """Real in-focus images for a modality from the shared data folder.

    Parameters
    ----------
    data_dir : Path
        The ``shared/data`` folder.
    modality : {"brightfield", "fluorescence"}
        Which images.

    Returns
    -------
    list of SourceImage
        Sorted by path.
    """
    found: list[SourceImage] = []
    if modality == "brightfield":
        for folder in ("camelyon16", "dsb2018_stained", "kather_tcga_tiles", "openslide_crops"):
            for p in sorted((data_dir / "he" / folder).glob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(SourceImage(str(p), f"he/{folder}"))
    elif modality == "fluorescence":
        manifest = data_dir / "fluo" / "dsb2018" / "manifest.csv"
        if manifest.exists():
            import csv

            with manifest.open() as f:
                for row in csv.DictReader(f):
                    if row["category"] == "fluorescence":
                        path = data_dir / "fluo" / "dsb2018" / row["file"]
                        found.append(SourceImage(str(path), "fluo/dsb2018"))
        for p in sorted((data_dir / "fluo" / "cellprofiler_human" / "images").glob("*.tif")):
            found.append(SourceImage(str(p), "fluo/cellprofiler_human"))
        stardist = data_dir / "fluo" / "stardist_img2d.tif"
        if stardist.exists():
            found.append(SourceImage(str(stardist), "fluo/stardist_img2d"))
    else:
        raise ConfigError("modality", f"unknown modality {modality!r}")
    if not found:
        raise ConfigError(data_dir, f"no {modality} source images found")
    return found


def split_key(source: SourceImage) -> float:
    """A number in [0, 1) from a hash of the source's file name (stable everywhere).

    :func:`split_of` thresholds it; :mod:`wsi_deepr.zstack` ranks fields of view by it.
    """
    digest = hashlib.sha256(Path(source.path).name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(
    source: SourceImage, *, test_fraction: float = 0.15, val_fraction: float = 0.15
) -> Split:
    """The split a source belongs to, from a hash of its file name (stable everywhere).

    Parameters
    ----------
    source : SourceImage
        The field of view.
    test_fraction : float
        Share held out for evaluation.
    val_fraction : float
        Share of the rest used for validation during training (paper: 0.15).

    Returns
    -------
    {"train", "val", "test"}
    """
    u = split_key(source)
    if u < test_fraction:
        return "test"
    if u < test_fraction + (1 - test_fraction) * val_fraction:
        return "val"
    return "train"


def write_split_manifest(
    sources: list[SourceImage],
    path: Path,
    *,
    split: Callable[[SourceImage], Split] = split_of,
) -> dict[str, list[str]]:
    """Write which source file went to which split, as JSON.

    Parameters
    ----------
    sources : list of SourceImage
        All sources.
    path : Path
        Where to write the manifest.
    split : callable, optional
        The split of a source; :func:`split_of` by default.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` of file names.
    """
    manifest: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for s in sources:
        manifest[split(s)].append(Path(s.path).name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return manifest


def srgb_to_linear(x: NDArray[np.floating]) -> NDArray[np.float32]:
    """Decode sRGB values in [0, 1] to linear intensity."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: NDArray[np.floating]) -> NDArray[np.float32]:
    """Encode linear intensity in [0, 1] as sRGB."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055).astype(np.float32)


def load_in_focus(source: SourceImage, modality: str) -> NDArray[np.float32]:
    """Read a source image as float ``(c, y, x)`` in [0, 1] (display values).

    Parameters
    ----------
    source : SourceImage
        The file.
    modality : {"brightfield", "fluorescence"}
        Brightfield gives 3 channels (alpha dropped), fluorescence 1 (grey).

    Returns
    -------
    ndarray of shape (C, Y, X), float32
    """
    import tifffile
    from PIL import Image

    path = Path(source.path)
    if path.suffix.lower() in {".tif", ".tiff"}:
        arr = np.asarray(tifffile.imread(path))
    else:
        with Image.open(path) as im:
            arr = np.asarray(im)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else None
    arr = arr.astype(np.float32)
    if scale is None:
        lo, hi = np.percentile(arr, [0.1, 99.9])
        arr = (arr - lo) / max(hi - lo, 1e-6)
    else:
        arr /= scale
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if modality == "brightfield":
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(np.moveaxis(arr[..., :3], -1, 0))
    grey = arr if arr.ndim == 2 else arr[..., :3].mean(axis=-1)
    # Stretch weak 8-bit fluorescence to a usable range (robust max at 1).
    hi = float(np.percentile(grey, 99.9))
    if 0 < hi < 0.5:
        grey = grey / hi * 0.8
    return np.clip(grey, 0.0, 1.0)[None].astype(np.float32)


def _colour_jitter(
    target: NDArray[np.float32], rng: np.random.Generator, amount: float
) -> NDArray[np.float32]:
    """Scale the optical density of each channel (stain variation); greyscale sometimes."""
    od = -np.log(np.clip(target, 1e-3, 1.0))
    od *= (1.0 + rng.uniform(-amount, amount, size=(target.shape[0], 1, 1))).astype(np.float32)
    out = np.exp(-od).astype(np.float32)
    if rng.random() < 0.1:
        out[:] = out.mean(axis=0, keepdims=True)
    return out


def simulate_pair(
    region: NDArray[np.float32],
    settings: SimulationSettings,
    rng: np.random.Generator,
    *,
    crop_px: int,
) -> tuple[NDArray[np.float32], NDArray[np.float32], dict[str, float]]:
    """One defocused/in-focus pair from a region of an in-focus image.

    Parameters
    ----------
    region : ndarray of shape (C, Y, X)
        In-focus display values in [0, 1], at least ``crop_px`` on each side; a margin
        around the central crop avoids edge effects of the blur.
    settings : SimulationSettings
        The simulation parameters.
    rng : numpy.random.Generator
        Source of randomness.
    crop_px : int
        Edge of the returned pair.

    Returns
    -------
    input, target : ndarray of shape (C, crop_px, crop_px), float32 in [0, 1]
    meta : dict
        ``defocus_um``, ``mpp``, ``na``, ``spherical_waves``, ``photons``, and
        ``condenser_na`` when ``settings.condenser_na_range`` is set.
    """
    lo, hi = settings.defocus_range_um
    z = 0.0 if rng.random() < settings.in_focus_fraction else float(rng.uniform(lo, hi))
    mpp = float(rng.uniform(*settings.mpp_range))
    na = float(settings.na + rng.uniform(-settings.na_jitter, settings.na_jitter))
    sph = float(rng.uniform(-settings.spherical_waves_max, settings.spherical_waves_max))
    photons = float(math.exp(rng.uniform(*np.log(settings.photons_range))))
    condenser_na = None
    if settings.condenser_na_range is not None and settings.modality == "brightfield":
        condenser_na = min(float(rng.uniform(*settings.condenser_na_range)), na)
    target = region
    optics: tuple[physics.Optics, ...]
    if settings.modality == "brightfield":
        target = _colour_jitter(region, rng, settings.colour_jitter)
        optics = physics.brightfield_optics(
            na,
            mpp,
            immersion_index=settings.immersion_index,
            spherical_waves=sph,
            condenser_na=condenser_na,
        )
        linear = srgb_to_linear(target)
    else:
        wl = float(rng.uniform(*settings.emission_um_range))
        optics = (physics.Optics(na, wl, mpp, settings.immersion_index, sph),)
        linear = target
    blurred = physics.defocus_image(linear, z, optics=optics)
    noisy = physics.add_poisson_gaussian_noise(
        blurred, photons_at_one=photons, read_noise_e=settings.read_noise_e, rng=rng
    )
    y0 = (region.shape[1] - crop_px) // 2
    x0 = (region.shape[2] - crop_px) // 2
    window = (slice(None), slice(y0, y0 + crop_px), slice(x0, x0 + crop_px))
    if settings.modality == "brightfield":
        display = linear_to_srgb(noisy[window])
        q = int(rng.integers(settings.jpeg_quality_range[0], settings.jpeg_quality_range[1] + 1))
        defocused = physics.jpeg_roundtrip(display, quality=q)
    else:
        defocused = np.clip(noisy[window], 0.0, 1.0)
    meta = {"defocus_um": z, "mpp": mpp, "na": na, "spherical_waves": sph, "photons": photons}
    if condenser_na is not None:
        meta["condenser_na"] = condenser_na
    return defocused.astype(np.float32), np.ascontiguousarray(target[window]), meta


def random_region(
    image: NDArray[np.float32], size_px: int, rng: np.random.Generator
) -> NDArray[np.float32]:
    """A random square region, reflect-padded where the image is smaller."""
    _, h, w = image.shape
    pad_y, pad_x = max(0, size_px - h), max(0, size_px - w)
    if pad_y or pad_x:
        image = np.pad(
            image,
            ((0, 0), (pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)),
            mode="reflect",
        )
        h, w = image.shape[1:]
    y0 = int(rng.integers(0, h - size_px + 1))
    x0 = int(rng.integers(0, w - size_px + 1))
    return np.ascontiguousarray(image[:, y0 : y0 + size_px, x0 : x0 + size_px])


def simulation_margin_px(settings: SimulationSettings) -> int:
    """Margin around a crop that the widest blur of ``settings`` reaches, plus 8 px.

    A region of ``crop_px + 2 x margin`` passed to :func:`simulate_pair` gives a crop
    without edge effects.
    """
    max_blur_um = max(abs(v) for v in settings.defocus_range_um)
    opt = physics.Optics(settings.na + settings.na_jitter, 0.65, min(settings.mpp_range))
    return int(physics.psf(opt, max_blur_um).shape[0] // 2 + 8)


def build_bank(
    sources: list[SourceImage],
    settings: SimulationSettings,
    *,
    split: Split,
    n_pairs: int,
    crop_px: int,
    seed: int,
    out_path: Path,
) -> Path:
    """Simulate pairs from the sources of one split and store them as ``.npz``.

    Parameters
    ----------
    sources : list of SourceImage
        All sources; only those of ``split`` are used.
    settings : SimulationSettings
        Simulation parameters.
    split : {"train", "val", "test"}
        Which split to draw from.
    n_pairs : int
        How many pairs.
    crop_px : int
        Edge of each pair.
    seed : int
        Seed of the random generator (the bank is reproducible).
    out_path : Path
        The ``.npz`` file to write (atomically).

    Returns
    -------
    Path
        ``out_path``.
    """
    chosen = [s for s in sources if split_of(s) == split]
    if not chosen:
        raise ConfigError(out_path, f"no source images in split {split!r}")
    rng = np.random.default_rng(seed)
    images = [load_in_focus(s, settings.modality) for s in chosen]
    areas = np.array([im.shape[1] * im.shape[2] for im in images], dtype=np.float64)
    # Weight by the square root of the area: big crops give more pairs, but not all.
    weights = np.sqrt(areas) / np.sqrt(areas).sum()
    margin = simulation_margin_px(settings)
    channels = images[0].shape[0]
    dtype = np.uint8 if settings.modality == "brightfield" else np.uint16
    scale = 255.0 if dtype == np.uint8 else 65535.0
    inputs = np.empty((n_pairs, channels, crop_px, crop_px), dtype=dtype)
    targets = np.empty_like(inputs)
    meta_rows: list[list[float]] = []
    source_index = np.empty(n_pairs, dtype=np.int32)
    for i in range(n_pairs):
        k = int(rng.choice(len(images), p=weights))
        region = random_region(images[k], crop_px + 2 * margin, rng)
        x, y, meta = simulate_pair(region, settings, rng, crop_px=crop_px)
        inputs[i] = np.clip(np.rint(x * scale), 0, scale).astype(dtype)
        targets[i] = np.clip(np.rint(y * scale), 0, scale).astype(dtype)
        meta_rows.append([meta[key] for key in ("defocus_um", "mpp", "na", "spherical_waves")])
        source_index[i] = k
        if (i + 1) % 200 == 0:
            LOG.info("bank %s: %d/%d pairs", out_path.name, i + 1, n_pairs)
    return write_bank(
        out_path,
        inputs=inputs,
        targets=targets,
        meta=np.asarray(meta_rows, dtype=np.float32),
        source_index=source_index,
        sources=[s.path for s in chosen],
        settings=asdict(settings),
        scale=scale,
    )


def write_bank(
    out_path: Path,
    *,
    inputs: NDArray[Any],
    targets: NDArray[Any],
    meta: NDArray[np.float32],
    source_index: NDArray[np.int32],
    sources: list[str],
    settings: dict[str, Any],
    scale: float,
    **extra: NDArray[Any],
) -> Path:
    """Store pairs as a bank ``.npz`` that :class:`PairBank` reads (atomically, no pickle).

    Parameters
    ----------
    out_path : Path
        The ``.npz`` file to write.
    inputs, targets : ndarray of shape (N, C, H, W)
        Integer pairs; ``value / scale`` is the intensity in [0, 1].
    meta : ndarray of shape (N, 4), float32
        Per pair: defocus in micrometres, mpp, NA, spherical aberration (NaN: unknown).
    source_index : ndarray of shape (N,), int32
        Index into ``sources`` of each pair's field of view.
    sources : list of str
        Source files.
    settings : dict
        How the pairs were made (stored as JSON).
    scale : float
        Integer value of intensity 1.
    **extra : ndarray
        Further per-pair arrays kept in the file (ignored by :class:`PairBank`).

    Returns
    -------
    Path
        ``out_path``.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.npz")
    arrays: dict[str, NDArray[Any]] = {
        "inputs": inputs,
        "targets": targets,
        "meta": meta,
        "source_index": source_index,
        "sources": np.asarray(sources, dtype=str),
        "settings": np.asarray(json.dumps(settings)),
        "scale": np.asarray(scale, dtype=np.float32),
    }
    np.savez(tmp, **(arrays | extra))  # type: ignore[arg-type]  # numpy's stub: allow_pickle
    tmp.replace(out_path)
    return out_path


@dataclass(frozen=True)
class PairBank:
    """Pairs loaded from a bank file, as float32 in [0, 1]."""

    inputs: NDArray[np.float32]
    """Defocused inputs ``(N, C, H, W)``."""
    targets: NDArray[np.float32]
    """In-focus targets ``(N, C, H, W)``."""
    defocus_um: NDArray[np.float32]
    """Defocus of each pair."""
    sources: tuple[str, ...]
    """Source files the pairs were cut from."""

    @classmethod
    def load(cls, path: Path) -> PairBank:
        """Read a bank written by :func:`write_bank` (no pickle).

        Parameters
        ----------
        path : Path
            The ``.npz`` file.

        Returns
        -------
        PairBank
        """
        with np.load(path, allow_pickle=False) as f:
            scale = float(f["scale"])
            return cls(
                inputs=(f["inputs"].astype(np.float32) / scale),
                targets=(f["targets"].astype(np.float32) / scale),
                defocus_um=f["meta"][:, 0].astype(np.float32),
                sources=tuple(str(s) for s in f["sources"]),
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])
