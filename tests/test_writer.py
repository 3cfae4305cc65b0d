"""OME-Zarr pyramid writer: metadata that validates, alignment, completion record."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from wsi_deepr.errors import OutputError
from wsi_deepr.writer import is_complete, level_shapes, mark_complete, write_pyramid

MPP = 0.25


def write(image: np.ndarray, path: Path, *, ngff: str = "0.5", chunk_px: int = 512, **kw):
    names = tuple(f"C{i}" for i in range(image.shape[0]))
    return write_pyramid(
        da.from_array(image, chunks=(image.shape[0], chunk_px, chunk_px)),
        path,
        mpp=MPP,
        channel_names=names,
        channel_colors=("FF0000", "00FF00", "0000FF")[: image.shape[0]],
        provenance={"parameters": {"tile_px": 512}},
        ngff=ngff,
        **kw,
    )


def area_mean(image: np.ndarray) -> np.ndarray:
    c, h, w = image.shape
    blocks = image[:, : h // 2 * 2, : w // 2 * 2].astype(np.float64)
    mean = blocks.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    if image.dtype.kind in "ui":
        return np.rint(mean).astype(image.dtype)
    return mean.astype(image.dtype)


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_pyramid_validates_and_opens_with_scales_mpp_times_2k(tmp_path, ngff):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image = np.random.default_rng(0).integers(0, 256, (3, 2500, 2051), dtype=np.uint8)
    pyramid = write(image, tmp_path / "out.zarr", ngff=ngff)
    mark_complete(pyramid.path, {"ok": True}, {"parameters": {}})
    group = zarr.open_group(str(pyramid.path), mode="r")
    assert group.metadata.zarr_format == (3 if ngff == "0.5" else 2)
    if ngff == "0.5":
        from ome_zarr_models.v05 import Image
    else:
        from ome_zarr_models.v04 import Image
    Image.from_zarr(group)  # raises on invalid metadata

    node = next(iter(Reader(parse_url(str(pyramid.path)))()))
    assert [a.shape for a in node.data] == [(3, 2500, 2051), (3, 1250, 1025), (3, 625, 512)]
    transforms = node.metadata["coordinateTransformations"]
    for k, level in enumerate(transforms):
        assert level[0]["scale"] == [1.0, MPP * 2**k, MPP * 2**k]
    axes = node.metadata["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    assert axes[1]["unit"] == "micrometer" and axes[0]["type"] == "channel"
    np.testing.assert_array_equal(np.asarray(node.data[0]), image)
    np.testing.assert_array_equal(np.asarray(node.data[1]), area_mean(image))
    np.testing.assert_array_equal(np.asarray(node.data[2]), area_mean(area_mean(image)))
    omero = node.metadata.get("channel_names") or []
    assert omero == ["C0", "C1", "C2"]


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_levels_keep_the_dtype_and_zarr_chunks_match_dask_chunks(tmp_path, dtype):
    image = (np.random.default_rng(1).random((2, 1500, 1100)) * 1000).astype(dtype)
    pyramid = write(image, tmp_path / "out.zarr", chunk_px=448)
    group = zarr.open_group(str(pyramid.path), mode="r")
    for path in pyramid.level_paths:
        assert group[path].dtype == dtype
        assert group[path].chunks == ((2, 448, 448) if path == "s0" else (2, 224, 224))
    np.testing.assert_allclose(np.asarray(group["s1"]), area_mean(image), rtol=1e-6)


def test_store_is_incomplete_until_the_record_is_written(tmp_path):
    image = np.zeros((1, 100, 100), dtype=np.uint8)
    pyramid = write(image, tmp_path / "out.zarr")
    assert not is_complete(pyramid.path)
    assert zarr.open_group(str(pyramid.path)).attrs["wsi_deepr"]["complete"] is False
    mark_complete(pyramid.path, {"seconds": 1.0}, {"parameters": {}})
    assert is_complete(pyramid.path)
    assert (pyramid.path / "report.json").is_file()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_existing_output_is_refused_unchanged_and_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out.zarr"
    write(np.zeros((1, 64, 64), dtype=np.uint8), out)
    with pytest.raises(OutputError, match="interrupted run") as refused:
        write(np.ones((1, 64, 64), dtype=np.uint8), out)
    assert "--resume" in refused.value.one_line() and "--overwrite" in refused.value.one_line()
    mark_complete(out, {"seconds": 1.0}, {"parameters": {}})
    before = tree_bytes(out)
    with pytest.raises(OutputError, match="already exists"):
        write(np.ones((1, 64, 64), dtype=np.uint8), out)
    assert tree_bytes(out) == before
    write(np.ones((1, 64, 64), dtype=np.uint8), out, overwrite=True)
    assert np.asarray(zarr.open_group(str(out))["s0"]).min() == 1


def test_output_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path):
    image = np.zeros((1, 8, 8), dtype=np.uint8)
    a_file = tmp_path / "out.zarr"
    a_file.write_bytes(b"precious")
    with pytest.raises(OutputError, match="not a folder"):
        write(image, a_file, overwrite=True)
    assert a_file.read_bytes() == b"precious"
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a zarr store"):
        write(image, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep"


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root writes into read-only folders; test_hostile.py runs this case as root "
    "through the CLI with CAP_DAC_OVERRIDE dropped",
)
def test_output_in_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write(np.zeros((1, 8, 8), dtype=np.uint8), locked / "out.zarr")
    finally:
        locked.chmod(0o700)


def test_pyramid_stops_near_1024_px():
    assert level_shapes((3, 20000, 8000))[-1] == (3, 625, 250)
    assert level_shapes((1, 1024, 3)) == [(1, 1024, 3)]
