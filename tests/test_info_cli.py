"""``wsi-deepr info``: what a user sees, including the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RGB_MPP

from wsi_deepr.cli import main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text(tiff_slide: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["info", str(tiff_slide)], capsys)
    assert code == 0, err
    assert "format     tiff" in out
    assert "3001 x 2047 px" in out
    assert "1.500 x 1.024 mm" in out  # 3001 px x 0.5 um, 2047 px x 0.5 um
    assert "mpp        0.5 um/px" in out
    assert "channels   3: R, G, B" in out
    assert "dtype      uint8" in out
    assert "modality   brightfield" in out
    assert "levels     5: 3001 x 2047, 1500 x 1023" in out
    assert "tissue" in out and "%" in out


def test_info_json(ome_zarr_04: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["info", str(ome_zarr_04), "--json"], capsys)
    assert code == 0, err
    facts = json.loads(out)
    assert facts["format"] == "ome-zarr:0.4"
    assert (facts["width_px"], facts["height_px"]) == (900, 1100)
    assert facts["mpp"] == pytest.approx(0.325)
    assert facts["channels"] == ["DAPI", "FITC", "TRITC"]
    assert facts["dtype"] == "uint16"
    assert facts["modality"] == "fluorescence"
    assert facts["levels"][0] == [3, 1100, 900]
    assert facts["area_mm2"] == pytest.approx(1100 * 900 * 0.325**2 * 1e-6)
    assert 0.0 < facts["tissue_fraction"] < 1.0


def test_info_mpp_option(png_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["info", str(png_image)], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"wsi-deepr: error: {png_image}: PNG/JPEG has no microscope pixel size (pass --mpp)"
    ]
    code, out, _ = _run(["info", str(png_image), "--mpp", str(RGB_MPP), "--json"], capsys)
    assert code == 0 and json.loads(out)["mpp"] == RGB_MPP
    code, _, err = _run(["info", str(png_image), "--mpp", "0"], capsys)
    assert code == 2 and "--mpp" in err


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.svs", b"", "the file is empty"),
        ("noise.ndpi", bytes(range(256)) * 8, "not a slide format"),
    ],
)
def test_info_bad_file_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, problem: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = _run(["info", str(path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"wsi-deepr: error: {path}: {problem}")
    assert "Traceback" not in err


def test_info_corrupt_zarr_no_traceback_at_exit(tmp_path: Path, ome_zarr_05: Path) -> None:
    """A chunk that fails to decode gives one line, and no asyncio noise at exit."""
    import shutil

    store = tmp_path / "bad.zarr"
    shutil.copytree(ome_zarr_05, store)
    for chunk in (store / "s1" / "c" / "0").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    result = subprocess.run(
        [sys.executable, "-m", "wsi_deepr", "info", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"wsi-deepr: error: {store}: cannot read pixels at s1")
