"""Readers: pixels equal a whole-array read of the same file, pixel sizes as written,
lazy chunked access, and every bad input a clear InputError naming the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from conftest import FLUO_MPP, RGB_MPP
from hostile_inputs import tiff_with_tile_offset_past_end, truncated_tiff, zero_width_tiff
from slides import make_jpeg, make_ome_tiff, make_png, make_tiff_slide, synthetic_tissue

from wsi_deepr.errors import (
    InputError,
    MetadataError,
    OptionError,
    UnsupportedFormatError,
)
from wsi_deepr.readers import detect_format, open_slide
from wsi_deepr.readers.openslide_reader import open_openslide
from wsi_deepr.readers.tiff_reader import TiffLevelSource


def _tifffile_cyx(path: Path) -> np.ndarray:
    """Level 0 read whole by tifffile, as (c, y, x)."""
    ref = tifffile.imread(path)
    if ref.ndim == 2:
        return ref[None]
    with tifffile.TiffFile(path) as tif:
        axes = tif.series[0].axes
    return np.moveaxis(ref, -1, 0) if axes.endswith("S") else ref


# --- TIFF -------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiff_slide", "tiff_slide_subifds"])
def test_tiff_pyramid_reads_like_tifffile(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    slide = open_slide(path)
    assert slide.format_name == "tiff"
    assert isinstance(slide.data, da.Array)
    assert slide.data.shape == (3, 2047, 3001)
    assert slide.data.chunksize == (3, 1024, 1024)
    assert slide.data.numblocks == (1, 2, 3)
    assert slide.mpp == pytest.approx(RGB_MPP, rel=1e-9)
    assert slide.modality == "brightfield"
    assert slide.channel_names == ("R", "G", "B")
    assert len(slide.level_shapes) == 5
    # the thumbnail is the stored 2x level, not a recomputation
    assert slide.thumbnail.shape == (3, 1023, 1500)
    assert slide.thumbnail_downsample == pytest.approx(2.0, rel=1e-3)
    np.testing.assert_array_equal(slide.data.compute(), _tifffile_cyx(path))
    with tifffile.TiffFile(path) as tif:
        level1 = tif.series[0].levels[1].asarray()
    np.testing.assert_array_equal(slide.thumbnail.compute(), np.moveaxis(level1, -1, 0))


def test_one_block_reads_only_its_region(
    tiff_slide: Path, rgb_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    slide = open_slide(tiff_slide)
    calls: list[tuple[int, int, int, int]] = []
    original = TiffLevelSource.read

    def counting(self: TiffLevelSource, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        calls.append((y0, y1, x0, x1))
        return original(self, y0, y1, x0, x1)

    monkeypatch.setattr(TiffLevelSource, "read", counting)
    block = slide.data.blocks[0, 1, 2].compute()
    assert calls == [(1024, 2047, 2048, 3001)]
    np.testing.assert_array_equal(block, rgb_image[:, 1024:, 2048:])


def test_many_threads_read_the_same_file_consistently(
    tiff_slide_subifds: Path, rgb_image: np.ndarray
) -> None:
    """Tiles are read with seek + read on one shared handle: that must be atomic."""
    slide = open_slide(tiff_slide_subifds)
    small = slide.data.rechunk((3, 256, 256))
    for _ in range(3):
        np.testing.assert_array_equal(small.compute(scheduler="threads", num_workers=8), rgb_image)


def test_graph_pickles_for_distributed_workers(tiff_slide: Path, ome_zarr_05: Path) -> None:
    for path in (tiff_slide, ome_zarr_05):
        slide = open_slide(path)
        clone = pickle.loads(pickle.dumps(slide.data))
        np.testing.assert_array_equal(
            clone[:, 1000:1100, 2900:3001].compute(),
            slide.data[:, 1000:1100, 2900:3001].compute(),
        )


def test_ome_tiff_multichannel_uint16(ome_tiff_slide: Path, fluo_image: np.ndarray) -> None:
    slide = open_slide(ome_tiff_slide)
    assert slide.format_name == "ome-tiff"
    assert slide.dtype == np.uint16
    assert slide.mpp == pytest.approx(FLUO_MPP)
    assert slide.channel_names == ("DAPI", "FITC", "TRITC")
    assert slide.modality == "fluorescence"
    assert slide.level_shapes[1] == (3, 550, 450)
    np.testing.assert_array_equal(slide.data.compute(), fluo_image)
    np.testing.assert_array_equal(slide.data.compute(), _tifffile_cyx(ome_tiff_slide))


@pytest.mark.parametrize(
    ("dtype", "n_channels"),
    [(np.uint8, 2), (np.uint16, 5), (np.float32, 1), (np.int16, 2)],
)
def test_plain_tiff_channels_and_dtypes(tmp_path: Path, dtype: type, n_channels: int) -> None:
    image = synthetic_tissue((300, 500), seed=3, rgb=False, n_channels=n_channels, dtype=dtype)
    if np.dtype(dtype) == np.int16:
        image = image - 1000
    path = make_tiff_slide(tmp_path / "x.tif", image, 0.25, tile=128)
    slide = open_slide(path)
    assert slide.n_channels == n_channels
    assert slide.dtype == np.dtype(dtype)
    assert slide.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(slide.data.compute(), image)


def test_strip_tiff_rgba_and_16bit_rgb(tmp_path: Path) -> None:
    rgb = synthetic_tissue((200, 300), seed=4)
    rgba = np.concatenate([rgb, np.full((1, 200, 300), 255, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", np.moveaxis(rgba, 0, -1), photometric="rgb")
    slide = open_slide(tmp_path / "rgba.tif", mpp=0.5)
    np.testing.assert_array_equal(slide.data.compute(), rgb)

    rgb16 = rgb.astype(np.uint16) * 257
    tifffile.imwrite(
        tmp_path / "rgb16.tif",
        np.moveaxis(rgb16, 0, -1),
        photometric="rgb",
        resolution=(4e4, 4e4),
        resolutionunit="CENTIMETER",
    )
    slide = open_slide(tmp_path / "rgb16.tif")
    assert slide.mpp == pytest.approx(0.25)
    assert slide.modality == "brightfield"
    np.testing.assert_array_equal(slide.data.compute(), rgb16)


@pytest.mark.parametrize(
    ("byteorder", "rows_per_strip", "n_channels", "planar"),
    [(">", 7, 2, "separate"), ("<", None, 3, "contig"), (">", 100, 3, "contig")],
)
def test_uncompressed_strips_read_row_by_row(
    tmp_path: Path, byteorder: str, rows_per_strip: int | None, n_channels: int, planar: str
) -> None:
    image = synthetic_tissue(
        (1500, 1300), seed=14, rgb=False, n_channels=n_channels, dtype=np.uint16
    )
    data = image if planar == "separate" else np.moveaxis(image, 0, -1)
    tifffile.imwrite(
        tmp_path / "strips.tif",
        data,
        byteorder=byteorder,
        rowsperstrip=rows_per_strip,
        photometric="minisblack",
        planarconfig=planar,
        metadata=None,
    )
    slide = open_slide(tmp_path / "strips.tif", mpp=0.5)
    np.testing.assert_array_equal(slide.data.compute(), image)
    np.testing.assert_array_equal(
        slide.data[:, 1030:1100, 700:1250].compute(), image[:, 1030:1100, 700:1250]
    )


def test_single_level_tiff_gets_lazy_block_mean_thumbnail(tmp_path: Path) -> None:
    image = synthetic_tissue((2600, 4500), seed=5)
    path = make_tiff_slide(tmp_path / "flat.tif", image, 0.5, pyramid=False, tile=512)
    slide = open_slide(path)
    assert slide.level_shapes == ((3, 2600, 4500),)
    assert slide.thumbnail_downsample == 4.0
    assert max(slide.thumbnail.shape[1:]) <= 2048
    expected = image[:, :2600, :4500].reshape(3, 650, 4, 1125, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(slide.thumbnail.compute(), np.round(expected), atol=1)


def test_one_by_one_and_long_strip(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "one.tif", np.array([[7]], np.uint8))
    slide = open_slide(tmp_path / "one.tif", mpp=1.0)
    assert slide.data.shape == (1, 1, 1)
    assert slide.data.compute()[0, 0, 0] == 7

    strip = (np.arange(1_000_000) % 251).astype(np.uint8)[None, :]
    tifffile.imwrite(tmp_path / "strip.tif", strip)
    slide = open_slide(tmp_path / "strip.tif", mpp=1.0)
    assert slide.data.shape == (1, 1, 1_000_000)
    assert max(slide.thumbnail.shape[1:]) <= 2048 and min(slide.thumbnail.shape[1:]) >= 1
    np.testing.assert_array_equal(
        slide.data[0, 0, 500_000:500_100].compute(), strip[0, 500_000:500_100]
    )

    column = np.ascontiguousarray(strip.T)  # 1,000,000 rows x 1 column
    tifffile.imwrite(tmp_path / "column.tif", column, tile=None)
    slide = open_slide(tmp_path / "column.tif", mpp=1.0)
    assert slide.data.shape == (1, 1_000_000, 1)
    assert slide.data.numblocks == (1, 977, 1)
    np.testing.assert_array_equal(slide.data[0, 999_000:, 0].compute(), column[999_000:, 0])
    assert slide.thumbnail.compute().shape == (1, 1953, 1)


# --- pixel size rules -------------------------------------------------------------------


def test_mpp_override_and_resolution_units(tmp_path: Path, tiff_slide: Path) -> None:
    assert open_slide(tiff_slide, mpp=0.25).mpp == 0.25
    image = synthetic_tissue((64, 64), seed=6)
    tifffile.imwrite(
        tmp_path / "inch.tif",
        np.moveaxis(image, 0, -1),
        photometric="rgb",
        resolution=(25400 / 0.4, 25400 / 0.4),
        resolutionunit="INCH",
    )
    assert open_slide(tmp_path / "inch.tif").mpp == pytest.approx(0.4)


@pytest.mark.parametrize("file_mpp", [None, 0.0, -1.0, float("nan"), 1000.0, 0.001])
def test_missing_or_absurd_mpp_needs_option(tmp_path: Path, file_mpp: float | None) -> None:
    image = synthetic_tissue((64, 80), seed=7, rgb=False, n_channels=2, dtype=np.uint16)
    path = tmp_path / "fluo.ome.tif"
    if file_mpp is None:
        make_ome_tiff(path, image, None, tile=16, pyramid=False)
    else:
        # tifffile validates nothing here, as a careless writer would
        make_ome_tiff(path, image, file_mpp, tile=16, pyramid=False)
    with pytest.raises(MetadataError) as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert "--mpp" in info.value.one_line()
    assert open_slide(path, mpp=0.3).mpp == 0.3


def test_default_72_dpi_is_not_a_pixel_size(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "dpi.tif", np.zeros((32, 32), np.uint8), resolution=(72, 72))
    with pytest.raises(MetadataError, match="outside"):
        open_slide(tmp_path / "dpi.tif")


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), 500.0, 0.01])
def test_user_mpp_out_of_range_is_an_option_error(tiff_slide: Path, bad: float) -> None:
    with pytest.raises(OptionError, match="--mpp"):
        open_slide(tiff_slide, mpp=bad)


# --- OME-Zarr ---------------------------------------------------------------------------


def test_ome_zarr_05(ome_zarr_05: Path, rgb_image: np.ndarray) -> None:
    slide = open_slide(ome_zarr_05)
    assert slide.format_name == "ome-zarr:0.5"
    assert slide.mpp == pytest.approx(RGB_MPP)
    assert slide.data.chunksize == (3, 1024, 1024)
    assert slide.channel_colors == ("FF0000", "00FF00", "0000FF")
    assert slide.thumbnail.shape == (3, 1023, 1500)
    np.testing.assert_array_equal(slide.data.compute(), rgb_image)
    np.testing.assert_array_equal(slide.data.compute(), zarr.open_array(ome_zarr_05 / "s0")[:])


def test_ome_zarr_04_and_file_url(ome_zarr_04: Path, fluo_image: np.ndarray) -> None:
    slide = open_slide(ome_zarr_04)
    assert slide.format_name == "ome-zarr:0.4"
    assert slide.mpp == pytest.approx(FLUO_MPP)
    assert slide.channel_names == ("DAPI", "FITC", "TRITC")
    assert slide.modality == "fluorescence"
    np.testing.assert_array_equal(slide.data.compute(), fluo_image)
    by_url = open_slide(f"file://{ome_zarr_04}")
    np.testing.assert_array_equal(by_url.data[:, :100, :100].compute(), fluo_image[:, :100, :100])


def test_ome_zarr_over_http(slide_dir: Path, ome_zarr_05: Path, rgb_image: np.ndarray) -> None:
    """An fsspec URL: the store served by a local HTTP server (no network needed)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(slide_dir))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{ome_zarr_05.name}"
        slide = open_slide(url)
        assert slide.format_name == "ome-zarr:0.5" and slide.mpp == pytest.approx(RGB_MPP)
        np.testing.assert_array_equal(
            slide.data.blocks[0, 1, 2].compute(), rgb_image[:, 1024:, 2048:]
        )
        with pytest.raises(InputError, match=r"cannot open the store|no Zarr group") as info:
            open_slide(url.replace(ome_zarr_05.name, "missing.zarr"))
        assert "missing.zarr" in str(info.value)
    finally:
        server.shutdown()


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_ome(store: Path, edit) -> None:  # type: ignore[no-untyped-def]
    import json

    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["ome"])
    meta_path.write_text(json.dumps(meta))


def test_ome_zarr_missing_level(tmp_path: Path, ome_zarr_05: Path) -> None:
    import shutil

    store = _copy_store(ome_zarr_05, tmp_path / "s.zarr")
    shutil.rmtree(store / "s2")
    with pytest.raises(MetadataError, match=r"'s2'.*missing") as info:
        open_slide(store)
    assert str(store) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ome: ome.update(version="0.6"), "version '0.6'"),
        (lambda ome: ome.update(version="0.3"), "version '0.3'"),
        (lambda ome: ome["multiscales"][0]["axes"].insert(0, {"name": "t"}), "dimensions"),
        (
            lambda ome: ome["multiscales"][0]["datasets"].reverse(),
            "does not follow",
        ),
        (
            lambda ome: ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0].update(
                scale=[1.0, 0.5]
            ),
            "does not have 3 values",
        ),
        (lambda ome: ome.pop("multiscales"), "multiscales"),
        (
            lambda ome: ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0].update(
                scale=[1.0, 8.0, 8.0]
            ),
            "scale says 16x",
        ),
    ],
)
def test_ome_zarr_metadata_contradicting_arrays(
    tmp_path: Path, ome_zarr_05: Path, edit, message: str
) -> None:  # type: ignore[no-untyped-def]
    store = _copy_store(ome_zarr_05, tmp_path / "s.zarr")
    _edit_ome(store, edit)
    with pytest.raises(InputError, match=message) as info:
        open_slide(store)
    assert str(store) in str(info.value)


def test_ome_zarr_corrupt_chunk_fails_at_compute_naming_region(
    tmp_path: Path, ome_zarr_05: Path
) -> None:
    store = _copy_store(ome_zarr_05, tmp_path / "s.zarr")
    (store / "s0" / "c" / "0" / "3" / "4").write_bytes(b"not a zstd frame")
    slide = open_slide(store)  # the thumbnail (level s1) is intact
    np.testing.assert_array_equal(slide.data.blocks[0, 0, 0].compute().shape, (3, 1024, 1024))
    with pytest.raises(InputError, match=r"rows 1024:2047, columns 2048:3001") as info:
        slide.data.blocks[0, 1, 2].compute()
    assert str(store) in str(info.value)


# --- PNG / JPEG -------------------------------------------------------------------------


def test_png_needs_mpp_and_reads_whole(png_image: Path, rgb_image: np.ndarray) -> None:
    with pytest.raises(MetadataError, match=r"--mpp|pixel size"):
        open_slide(png_image)
    slide = open_slide(png_image, mpp=0.25)
    assert slide.format_name == "png"
    assert slide.mpp == 0.25
    np.testing.assert_array_equal(slide.data.compute(), rgb_image[:, :500, :600])


def test_png_grey16_rgba_and_jpeg(tmp_path: Path) -> None:
    grey = synthetic_tissue((90, 120), seed=8, rgb=False, dtype=np.uint16)
    slide = open_slide(make_png(tmp_path / "g.png", grey), mpp=0.5)
    assert slide.dtype == np.uint16 and slide.modality == "fluorescence"
    np.testing.assert_array_equal(slide.data.compute(), grey)

    rgb = synthetic_tissue((90, 120), seed=9)
    rgba = np.concatenate([rgb, np.full((1, 90, 120), 255, np.uint8)])
    slide = open_slide(make_png(tmp_path / "rgba.png", rgba), mpp=0.5)
    np.testing.assert_array_equal(slide.data.compute(), rgb)

    slide = open_slide(make_jpeg(tmp_path / "f.jpg", rgb), mpp=0.5)
    assert slide.format_name == "jpeg" and slide.data.shape == (3, 90, 120)
    assert np.abs(slide.data.compute().astype(int) - rgb).mean() < 8


def test_oversized_png_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    path = make_png(tmp_path / "big.png", synthetic_tissue((100, 100), seed=13))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for a 200-megapixel PNG
    with pytest.raises(InputError, match="too large") as info:
        open_slide(path, mpp=0.5)
    assert "tiled TIFF" in info.value.one_line()


def test_format_is_detected_by_content(tmp_path: Path, png_image: Path, tiff_slide: Path) -> None:
    disguised = tmp_path / "really_a_png.tif"
    disguised.write_bytes(png_image.read_bytes())
    assert detect_format(disguised) == "image"
    disguised = tmp_path / "really_a_tiff.png"
    disguised.write_bytes(tiff_slide.read_bytes())
    assert detect_format(disguised) == "tiff"


# --- hostile input ----------------------------------------------------------------------
# The inputs are made in hostile_inputs.py; test_hostile.py runs each through the CLI.


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.svs", b""),
        ("random.svs", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("random.ndpi", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
        (
            "random.tif",
            b"II*\x00" + bytes(np.random.default_rng(2).integers(0, 256, 500, np.uint8)),
        ),
        ("header_only.tif", b"II*\x00\x08\x00\x00\x00"),
        ("text.png", b"hello, not an image"),
        ("cut.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"),
        ("cut.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"),
    ],
)
def test_garbage_files_raise_input_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        open_slide(path, mpp=0.5)
    assert str(path) in str(info.value)
    assert "\n" not in info.value.one_line()


def test_missing_path_and_plain_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UnsupportedFormatError, match="folder"):
        open_slide(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1, 0.01])
def test_truncated_tiff(tmp_path: Path, keep: float) -> None:
    path = truncated_tiff(tmp_path / "cut.tif", keep=keep)
    with pytest.raises(InputError) as info:
        open_slide(path).data.compute()
    assert str(path) in str(info.value)


def test_tile_offsets_past_end(tmp_path: Path) -> None:
    path = tiff_with_tile_offset_past_end(tmp_path / "offsets.tif")
    with pytest.raises(InputError, match=r"end of|past|truncated|bytes") as info:
        open_slide(path)
    assert str(path) in str(info.value)


def test_zero_sized_image(tmp_path: Path) -> None:
    path = zero_width_tiff(tmp_path / "zero.tif")
    with pytest.raises(InputError) as info:
        open_slide(path)
    assert str(path) in str(info.value)


def test_corrupt_tile_fails_at_compute_naming_region(tmp_path: Path) -> None:
    image = synthetic_tissue((2100, 2100), seed=11)
    path = make_tiff_slide(tmp_path / "bad.tif", image, 0.5, tile=256, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[70], page.databytecounts[70]  # row 7, column 7
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    slide = open_slide(path)  # metadata and the stored thumbnail level are fine
    slide.data.blocks[0, 0, 0].compute()
    with pytest.raises(InputError, match=r"rows 1024:2048, columns 1024:2048") as info:
        slide.data.blocks[0, 1, 1].compute()
    assert str(path) in str(info.value)


def test_nan_and_inf_float_images(tmp_path: Path) -> None:
    image = synthetic_tissue((300, 300), seed=12, rgb=False, dtype=np.float32)
    image[0, 10, 20] = np.nan
    path = make_tiff_slide(tmp_path / "nan.tif", image, 0.5, tile=64)
    with pytest.raises(InputError, match="NaN or infinite") as info:
        open_slide(path).data.compute()
    assert str(path) in str(info.value)

    image[0, 10, 20] = np.inf
    path = make_tiff_slide(tmp_path / "inf.tif", image, 0.5, tile=64)
    with pytest.raises(InputError, match="NaN or infinite"):
        open_slide(path).data.compute()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 40, 40), np.complex64), "pixel type"),
        (np.zeros((40, 40), np.int64), "pixel type"),
        (np.zeros((40, 40), bool), "pixel type|bit"),
    ],
)
def test_unsupported_pixel_types(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, array)
    with pytest.raises(UnsupportedFormatError, match=message):
        open_slide(path, mpp=0.5)


def test_z_stack_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 2, 32, 32), np.uint8), metadata={"axes": "ZCYX"})
    with pytest.raises(UnsupportedFormatError, match="z-stack"):
        open_slide(path, mpp=0.5)


# --- OpenSlide --------------------------------------------------------------------------


def test_openslide_reader_on_generic_tiff(tiff_slide: Path, rgb_image: np.ndarray) -> None:
    slide = open_openslide(tiff_slide)
    assert slide.format_name == "openslide:generic-tiff"
    assert slide.mpp == pytest.approx(RGB_MPP)
    assert slide.level_shapes[:2] == ((3, 2047, 3001), (3, 1023, 1500))
    np.testing.assert_array_equal(slide.data.compute(), rgb_image)


def test_openslide_corrupt_tile_fails_only_its_region(tmp_path: Path) -> None:
    image = synthetic_tissue((2100, 2100), seed=15)
    path = make_tiff_slide(tmp_path / "bad.tif", image, 0.5, tile=256, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[70], tif.pages[0].databytecounts[70]
    data = bytearray(path.read_bytes())
    data[offset + 20 : offset + count] = b"\x00" * (count - 20)
    path.write_bytes(bytes(data))
    slide = open_openslide(path)
    with pytest.raises(InputError, match=r"rows 1024:2048, columns 1024:2048") as info:
        slide.data.blocks[0, 1, 1].compute()
    assert str(path) in str(info.value)
    # OpenSlide's handle is poisoned after an error; other regions still read
    assert slide.data.blocks[0, 0, 1].compute().shape == (3, 1024, 1024)


def test_openslide_svs(shared_wsi: Path) -> None:
    import openslide

    path = shared_wsi / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    assert slide.format_name == "openslide:aperio"
    assert slide.shape_yx == (2967, 2220)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.modality == "brightfield"
    assert slide.data.numblocks == (1, 3, 3)
    block = slide.data.blocks[0, 1, 2].compute()
    expected = np.asarray(openslide.OpenSlide(path).read_region((2048, 1024), 0, (172, 1024)))
    np.testing.assert_array_equal(block, np.moveaxis(expected[..., :3], -1, 0))


@pytest.mark.parametrize(
    ("name", "channel"), [("test3-DAPI-2-387.ndpi", 2), ("test3-TRITC-2-560.ndpi", 0)]
)
def test_openslide_ndpi_fluorescence(shared_wsi: Path, name: str, channel: int) -> None:
    slide = open_slide(shared_wsi / name)
    assert slide.format_name == "openslide:hamamatsu"
    assert slide.shape_yx == (4864, 3968)
    assert slide.mpp == pytest.approx(0.228, abs=1e-3)
    assert slide.modality == "fluorescence"
    assert len(slide.level_shapes) == 7
    thumb = slide.thumbnail.compute()
    assert max(thumb.shape[1:]) <= 2048
    # the signal lives in one channel of the RGB container
    assert int(np.argmax(thumb.reshape(3, -1).mean(axis=1))) == channel
    assert slide.data.blocks[0, 2, 1].compute().shape == (3, 1024, 1024)


# --- modality ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("background", "signal", "dtype", "expected"),
    [
        (240, 150, np.uint8, "brightfield"),
        (3900, 2000, np.uint16, "brightfield"),  # 12-bit camera in a 16-bit file
        (60000, 30000, np.uint16, "brightfield"),
        (0.92, 0.5, np.float32, "brightfield"),
        (5, 200, np.uint8, "fluorescence"),
        (300, 3000, np.uint16, "fluorescence"),
        (100, 110, np.uint16, "fluorescence"),  # dark noise only
        (0, 0, np.uint8, "fluorescence"),
        (0.01, 0.8, np.float32, "fluorescence"),
    ],
)
def test_modality_from_background(
    background: float, signal: float, dtype: type, expected: str
) -> None:
    from wsi_deepr.readers.base import guess_modality

    rng = np.random.default_rng(0)
    image = np.full((3, 100, 100), background, dtype=np.float64)
    image[:, 30:50, 30:60] = signal  # a minority of the pixels
    image *= 1 + 0.02 * rng.standard_normal(image.shape)
    if np.dtype(dtype).kind in "iu":
        image = np.clip(np.round(image), 0, np.iinfo(dtype).max)
    assert guess_modality(image.astype(dtype)) == expected


def test_open_file_handles_are_bounded(tmp_path: Path) -> None:
    """A batch over many slides in one process must not run out of file descriptors."""
    from wsi_deepr.readers import tiff_reader

    slides = []
    for i in range(tiff_reader.MAX_OPEN_FILES + 4):
        image = np.full((1, 40, 50), i, np.uint8)
        slides.append(open_slide(make_tiff_slide(tmp_path / f"{i}.tif", image, 0.5, tile=16)))
        assert len(tiff_reader._OPEN) <= tiff_reader.MAX_OPEN_FILES
    # the first handles were dropped; their slides reopen the file on demand
    for i, slide in enumerate(slides):
        assert int(slide.data[0, 5, 5].compute()) == i
