"""Interrupted runs: SIGKILL mid-run, ``--resume``, and what is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from slides import make_tiff_slide, synthetic_tissue
from tiny_models import make_slow_model

from wsi_deepr.chunk_progress import PROGRESS_DIR, ChunkProgress
from wsi_deepr.writer import is_complete

MPP = 0.5
TILE = ["--tile-px", "128", "--overlap-px", "16", "--no-tissue-mask"]
CHUNKS = ["--chunk-px", "336"]  # 3 tile strides: 5 x 5 chunks on the slide below


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    image = synthetic_tissue((1500, 1450), seed=11)
    return make_tiff_slide(tmp_path_factory.mktemp("slides") / "slide.tif", image, MPP)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_slow_model(tmp_path_factory.mktemp("models") / "slow.onnx", n_layers=16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slide, model) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    done = cli("run", str(slide), str(out), "--model", str(model), *TILE, *CHUNKS)
    assert done.returncode == 0, done.stderr
    return out


def cli(*args: str, wait: bool = True):
    command = [sys.executable, "-m", "wsi_deepr", *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def kill_midway(process: subprocess.Popen, out: Path, n_total: int, min_done: int = 3) -> int:
    """SIGKILL ``process`` once ``min_done`` chunks are stored; return how many were."""
    progress = ChunkProgress(out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if len(progress.done()) >= min_done:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    n_done = len(progress.done())
    assert min_done <= n_done < n_total, n_done
    return n_done


def store_contents(store: Path) -> dict[str, object]:
    """Every level's pixels and all metadata, timings removed."""
    group = zarr.open_group(str(store), mode="r")
    levels = {name: np.asarray(array) for name, array in group.arrays()}
    attrs = json.loads(json.dumps(dict(group.attrs)))
    attrs["wsi_deepr"].pop("timings")
    report = json.loads((store / "report.json").read_text())
    for varies in ("seconds", "model_seconds", "pyramid_seconds", "s_per_mm2",
                   "s_per_mm2_tissue", "tiles_per_s", "extra", "output_path"):  # fmt: skip
        report.pop(varies)
    return {"levels": levels, "attrs": attrs, "report": report}


def test_sigkilled_run_resumes_to_the_uninterrupted_result_without_recomputing(
    tmp_path, slide, model, reference
):
    out = tmp_path / "out.zarr"
    process = cli("run", str(slide), str(out), "--model", str(model), *TILE, *CHUNKS, wait=False)
    n_done = kill_midway(process, out, n_total=25)
    assert not is_complete(out)

    # Without --resume the interrupted store is refused, untouched, with what to do.
    refused = cli("run", str(slide), str(out), "--model", str(model), *TILE, *CHUNKS)
    assert refused.returncode == 2
    assert "interrupted run" in refused.stderr and "--resume" in refused.stderr
    assert len(ChunkProgress(out).done()) == n_done

    # The chunk size is taken from the interrupted run when not given again.
    resumed = cli("run", str(slide), str(out), "--model", str(model), *TILE, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert is_complete(out) and not (out / PROGRESS_DIR).exists()

    got, want = store_contents(out), store_contents(reference)
    assert got["levels"].keys() == want["levels"].keys()
    for name, pixels in want["levels"].items():
        np.testing.assert_array_equal(got["levels"][name], pixels, err_msg=name)
    assert got["attrs"]["ome"] == want["attrs"]["ome"]
    assert got["attrs"]["wsi_deepr"] == want["attrs"]["wsi_deepr"]
    assert got["report"] == want["report"]

    extra = json.loads((out / "report.json").read_text())["extra"]
    full = json.loads((reference / "report.json").read_text())["extra"]
    assert extra["chunks_total"] == full["chunks_total"] == 25
    assert extra["chunks_reused"] >= n_done
    assert extra["chunks_computed"] == 25 - extra["chunks_reused"]
    # finished chunks' tiles were not run again
    assert 0 < extra["tiles_run_now"] < full["tiles_run_now"]
    assert full["tiles_run_now"] == json.loads((reference / "report.json").read_text())["tiles_run"]


def test_resume_with_other_settings_is_refused_and_a_finished_store_is_left_alone(
    tmp_path, slide, model, reference
):
    out = tmp_path / "out.zarr"
    process = cli("run", str(slide), str(out), "--model", str(model), *TILE, *CHUNKS, wait=False)
    n_done = kill_midway(process, out, n_total=25)
    other = cli("run", str(slide), str(out), "--model", str(model), "--tile-px", "256",
                "--overlap-px", "16", "--no-tissue-mask", "--resume")  # fmt: skip
    assert other.returncode == 2
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith(f"wsi-deepr: error: {out}: was started with other settings")
    assert "tile_px" in line and "Traceback" not in other.stderr
    assert len(ChunkProgress(out).done()) == n_done

    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    again = cli("run", str(slide), str(reference), "--model", str(model), *TILE, "--resume")
    assert again.returncode == 0, again.stderr
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before

    both = cli("run", str(slide), str(out), "--model", str(model), "--resume", "--overwrite")
    assert both.returncode == 2 and "--resume" in both.stderr

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").attrs["note"] = "someone else's"
    before = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    refused = cli("run", str(slide), str(foreign), "--model", str(model), "--resume")
    assert refused.returncode == 2 and "not an interrupted wsi-deepr run" in refused.stderr
    assert {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()} == before


def test_sigkilled_only_blurred_run_resumes_to_the_uninterrupted_result(
    tmp_path, tmp_path_factory, model
):
    """``--only-blurred``: the resumed store equals an uninterrupted run's, pixel for pixel,
    and the model ran only over the blurred half, in the killed and the resumed run alike."""
    from scipy import ndimage

    image = synthetic_tissue((1500, 1450), seed=12)
    # the lower half out of focus (a Gaussian of 6 px, 3 um), the upper half sharp
    image[:, 750:] = ndimage.gaussian_filter(image[:, 750:].astype(np.float32), (0, 6, 6)).round()
    slide = make_tiff_slide(tmp_path_factory.mktemp("half") / "half.tif", image, MPP)
    args = ("run", str(slide), "--model", str(model), *TILE, *CHUNKS, "--only-blurred")
    reference = tmp_path / "reference.zarr"
    done = cli(*args[:2], str(reference), *args[2:])
    assert done.returncode == 0, done.stderr
    full = json.loads((reference / "report.json").read_text())["extra"]
    selected = full["focus_qc"]["only_blurred"]
    assert 0 < selected["tiles_refocused"] < selected["tiles_tissue"], selected

    out = tmp_path / "out.zarr"
    process = cli(*args[:2], str(out), *args[2:], wait=False)
    # past the sharp upper two rows of chunks (pass-through), into the refocused ones
    n_done = kill_midway(process, out, n_total=25, min_done=15)
    resumed = cli(*args[:2], str(out), *args[2:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got, want = store_contents(out), store_contents(reference)
    for name, pixels in want["levels"].items():
        np.testing.assert_array_equal(got["levels"][name], pixels, err_msg=name)
    assert got["attrs"]["wsi_deepr"] == want["attrs"]["wsi_deepr"]
    extra = json.loads((out / "report.json").read_text())["extra"]
    assert extra["chunks_reused"] >= n_done
    # the model ran over the blurred half only, and the resumed run only where the killed
    # one had not finished
    assert full["tiles_run_now"] == selected["tiles_refocused"]
    assert 0 < extra["tiles_run_now"] < selected["tiles_refocused"]
    # the sharp upper half is the input, bit for bit, beyond the blend's reach above the
    # blurred half (one cell of growth and the 16 um fade, about 50 px here)
    np.testing.assert_array_equal(got["levels"]["s0"][:, :650], image[:, :650])
    assert not np.array_equal(got["levels"]["s0"][:, 800:], image[:, 800:])
