"""Shared fixtures: small real slides written once per test session, and the shared data.

The slide makers live in ``tests/slides.py`` so any test module can build its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slides import (
    make_ome_tiff,
    make_ome_zarr,
    make_png,
    make_tiff_slide,
    synthetic_tissue,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""``../shared/data`` beside the checkout (absent on some machines)."""

RGB_MPP = 0.5
FLUO_MPP = 0.325
ODD_SHAPE_YX = (2047, 3001)
"""Not a multiple of any tile or chunk size."""


@pytest.fixture(scope="session")
def shared_wsi() -> Path:
    """The folder of real whole-slide files; skips the test when it is absent."""
    folder = SHARED_DATA / "wsi"
    if not (folder / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"real slides not available ({folder} is absent)")
    return folder


@pytest.fixture(scope="session")
def rgb_image() -> np.ndarray:
    """H&E-like RGB uint8 ``(3, 2047, 3001)``."""
    return synthetic_tissue(ODD_SHAPE_YX, seed=0)


@pytest.fixture(scope="session")
def fluo_image() -> np.ndarray:
    """Three-channel uint16 fluorescence ``(3, 1100, 900)``."""
    return synthetic_tissue((1100, 900), seed=1, rgb=False, n_channels=3, dtype=np.uint16)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def tiff_slide(slide_dir: Path, rgb_image: np.ndarray) -> Path:
    """Pyramidal tiled RGB TIFF, levels as pages (what OpenSlide reads), 0.5 um/px."""
    return make_tiff_slide(slide_dir / "rgb_pages.tif", rgb_image, RGB_MPP, tile=256)


@pytest.fixture(scope="session")
def tiff_slide_subifds(slide_dir: Path, rgb_image: np.ndarray) -> Path:
    """The same slide with its pyramid in SubIFDs, zlib-compressed."""
    return make_tiff_slide(
        slide_dir / "rgb_subifds.tif",
        rgb_image,
        RGB_MPP,
        tile=256,
        layout="subifds",
        compression="zlib",
    )


@pytest.fixture(scope="session")
def ome_tiff_slide(slide_dir: Path, fluo_image: np.ndarray) -> Path:
    """Pyramidal OME-TIFF, 3 channels uint16, 0.325 um/px, named channels."""
    return make_ome_tiff(
        slide_dir / "fluo.ome.tif",
        fluo_image,
        FLUO_MPP,
        tile=256,
        channel_names=("DAPI", "FITC", "TRITC"),
    )


@pytest.fixture(scope="session")
def ome_zarr_05(slide_dir: Path, rgb_image: np.ndarray) -> Path:
    """OME-Zarr NGFF 0.5 (zarr 3) of the RGB slide."""
    return make_ome_zarr(slide_dir / "rgb05.zarr", rgb_image, RGB_MPP, version="0.5")


@pytest.fixture(scope="session")
def ome_zarr_04(slide_dir: Path, fluo_image: np.ndarray) -> Path:
    """OME-Zarr NGFF 0.4 (zarr 2) of the fluorescence image."""
    return make_ome_zarr(
        slide_dir / "fluo04.zarr",
        fluo_image,
        FLUO_MPP,
        version="0.4",
        channel_names=("DAPI", "FITC", "TRITC"),
    )


@pytest.fixture(scope="session")
def png_image(slide_dir: Path, rgb_image: np.ndarray) -> Path:
    """A 600 x 500 RGB PNG field of view."""
    return make_png(slide_dir / "fov.png", rgb_image[:, :500, :600])
