"""Issue 6, point 2: the hostile-input suite, end to end through ``wsi-deepr run``.

Whatever a user points wsi-deepr at, it either does the job right or stops with one
line ``wsi-deepr: error: <file>: <problem>``, exit code 2 (bad input or usage) or 1
(internal), no traceback, no output that looks complete, and every file that was there
before byte-identical. Each row of :data:`REFUSALS` is one case of the issue's list; the
inputs that must be processed (1 x 1 px, a 1,000,000 px strip, RGBA, 16-bit RGB, 2 and
5 fluorescence channels) are in the tests below the table.

Every run is a real ``python -m wsi_deepr run`` subprocess in a fresh work folder, with
real files and real ONNX Runtime. The same inputs are also opened directly in
``test_readers.py`` (library level).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from hostile_inputs import (
    STRIP_PX,
    edit_ome_metadata,
    float_tiff_with,
    ome_tiff_with_mpp,
    ome_zarr_pyramid,
    one_pixel_strip,
    plain_tiff,
    random_bytes,
    tiff_with_tile_offset_past_end,
    truncated_jpeg,
    truncated_tiff,
    zarr_with_corrupt_chunk,
    zarr_with_pixel_size,
    zarr_with_zero_sized_level,
    zarr_without_level,
    zero_width_tiff,
)
from slides import make_png, synthetic_tissue
from tiny_models import make_channel_mean_model, make_identity_model, make_unknown_op_model

import wsi_deepr
from wsi_deepr.writer import is_complete

PREFIX = "wsi-deepr: error: "
REPO = Path(wsi_deepr.__file__).resolve().parents[1]

# --- running the CLI ------------------------------------------------------------------

LAUNCHER = """
import ctypes, os, resource, sys
limit = int(os.environ.pop("HOSTILE_FSIZE_BYTES", "0"))
if limit:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if os.environ.pop("HOSTILE_NO_DAC_OVERRIDE", ""):
    # Root ignores file modes through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH). Drop
    # both from the bounding set; after the exec below they are gone from the process,
    # which then meets a read-only folder like any user, keeping its uid and files.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.stderr.write(f"HOSTILE: cannot drop capability {cap}\\n")
            sys.exit(99)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
CANNOT_DROP = 99


@dataclass(frozen=True, slots=True)
class Done:
    """A finished CLI run."""

    returncode: int
    stdout: str
    stderr: str
    max_rss_mb: float
    """Peak resident memory of the process."""


def run_cli(
    args: list[str],
    cwd: Path,
    *,
    fsize_bytes: int = 0,
    unprivileged: bool = False,
    python_args: tuple[str, ...] = ("-m", "wsi_deepr"),
    timeout_s: float = 300.0,
) -> Done:
    """Run ``python -m wsi_deepr ARGS`` in ``cwd`` and measure its peak memory.

    Parameters
    ----------
    args : list of str
        Arguments after the program name.
    cwd : Path
        Working folder of the process.
    fsize_bytes : int
        ``RLIMIT_FSIZE`` of the process (0: none): a disk that fills up.
    unprivileged : bool
        Make a root process obey file modes (no effect for other users).
    python_args : tuple of str
        What the interpreter runs (the CLI by default).
    timeout_s : float
        Kill the process after this many seconds.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    if fsize_bytes:
        env["HOSTILE_FSIZE_BYTES"] = str(fsize_bytes)
    if unprivileged and os.geteuid() == 0:
        env["HOSTILE_NO_DAC_OVERRIDE"] = "1"
    import subprocess

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *python_args, *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
        )
        deadline = time.monotonic() + timeout_s
        while True:  # os.wait4 rather than Popen.wait: it gives this child's rusage
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise TimeoutError(f"wsi-deepr {' '.join(args)} ran over {timeout_s} s")
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode == CANNOT_DROP and "HOSTILE: cannot drop" in stderr:
        pytest.skip("this root process may not drop CAP_DAC_OVERRIDE (no CAP_SETPCAP)")
    return Done(process.returncode, stdout, stderr, usage.ru_maxrss / 1024)


# --- the state of the disk --------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes, folder (``None``), link and pipe under ``root``, by relative path."""
    state: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = b"-> " + os.fsencode(os.readlink(path))
        elif path.is_dir():
            state[key] = None
        elif path.is_file():
            state[key] = path.read_bytes()
        else:  # a named pipe: reading would block
            state[key] = b"special file"
    return state


def assert_incomplete_store(store: Path) -> None:
    """The store is marked incomplete and shows no image: nothing looks finished."""
    assert not is_complete(store)
    attrs = zarr.open_group(str(store), mode="r").attrs.asdict()
    assert attrs["wsi_deepr"]["complete"] is False
    assert "ome" not in attrs and "multiscales" not in attrs, "viewers would show it"
    assert not (store / "report.json").exists()


# --- the table --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Models:
    """Tiny ONNX models shared by the cases (outside the work folders)."""

    any: Path
    """Identity, dynamic channel count: takes any slide."""
    rgb: Path
    """Identity, 3 channels."""
    grey: Path
    """Identity, 1 channel: runs multichannel slides channel by channel."""


Make = Callable[[Path, Models], list[str]]
"""Writes a case's inputs into the work folder; returns the arguments after ``run``."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A run that must stop cleanly."""

    case: str
    """The case, in the issue's words."""
    make: Make
    subject: str
    """The file (its name) or option the message must name."""
    problem: str
    """Regular expression the problem must match."""
    code: int = 2
    store: str = "none"
    """``"none"``: nothing at all is written; ``"incomplete"``: ``out.zarr`` is left
    marked incomplete (the input turned out bad while level 0 was being written)."""
    fsize_bytes: int = 0
    unprivileged: bool = False
    known_bug: str = ""
    """Why the case fails today (strict xfail: it must start passing once fixed)."""


def rgb_slide(w: Path) -> Path:
    return plain_tiff(w / "slide.tif", synthetic_tissue((200, 300), seed=1))


def fluo_slide(w: Path, n_channels: int) -> Path:
    image = synthetic_tissue((200, 300), seed=2, rgb=False, n_channels=n_channels, dtype=np.uint16)
    return plain_tiff(w / f"fluo{n_channels}.tif", image)


def slide_args(make_input: Callable[[Path], Path], *extra: str) -> Make:
    """A case whose only input is a slide made by ``make_input(work folder)``."""
    return lambda w, m: [str(make_input(w)), "out.zarr", *extra]


def with_model(make_model: Callable[[Path, Models], Path], slide=rgb_slide, *extra: str) -> Make:  # type: ignore[no-untyped-def]
    return lambda w, m: [str(slide(w)), "out.zarr", "--model", str(make_model(w, m)), *extra]


def existing_store(w: Path) -> Path:
    """A store from an earlier run (its bytes must survive)."""
    store = w / "out.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (store / "report.json").write_text('{"earlier": "run"}')
    return store


def read_only_folder(w: Path) -> Path:
    locked = w / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def foreign_folder(w: Path) -> Path:
    """A folder of the user's own files, not a store."""
    home = w / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    return home


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


def card_beside(onnx_path: Path, **card: object) -> Path:
    """Write a model card ``<name>.json`` beside an ONNX file."""
    import json

    values = {"name": onnx_path.stem, "modality": "brightfield", "channels": ["R", "G", "B"],
              "input_name": "input", "output_name": "output", **card}  # fmt: skip
    onnx_path.with_suffix(".json").write_text(json.dumps(values))
    return onnx_path


def noise_slide(w: Path) -> Path:
    """Incompressible RGB pixels: level 0 chunks of several MB."""
    image = np.random.default_rng(3).integers(0, 256, (3, 1500, 1500), dtype=np.uint8)
    return plain_tiff(w / "noise.tif", image)


def broken_onnx(w: Path, m: Models) -> Path:
    return random_bytes(w / "broken.onnx", n_bytes=500, prefix=b"\x08\x07")


def truncated_onnx(w: Path, m: Models) -> Path:
    data = m.rgb.read_bytes()
    (w / "cut.onnx").write_bytes(data[: len(data) // 2])
    return w / "cut.onnx"


REFUSALS: list[Refusal] = [
    # --- input files ---
    Refusal("missing slide file", lambda w, m: ["missing.svs", "out.zarr"], "missing.svs",
            "no such file or directory"),
    Refusal("slide is a named pipe (reading it would wait forever)",
            lambda w, m: [str(fifo(w / "pipe.svs")), "out.zarr"], "pipe.svs",
            "not a regular file"),
    Refusal("slide is a device", lambda w, m: [os.devnull, "out.zarr"], os.devnull,
            "not a regular file"),
    Refusal("slide is a folder that is not a store",
            lambda w, m: [str(foreign_folder(w)), "out.zarr"], "home",
            "a folder that is not a Zarr store"),
    Refusal("empty file", slide_args(lambda w: random_bytes(w / "empty.svs", n_bytes=0)),
            "empty.svs", "the file is empty"),
    Refusal("random bytes with a slide extension (.svs)",
            slide_args(lambda w: random_bytes(w / "noise.svs")), "noise.svs", "not a slide format"),
    Refusal("random bytes with a slide extension (.ndpi)",
            slide_args(lambda w: random_bytes(w / "noise.ndpi", seed=1)), "noise.ndpi",
            "not a slide format"),
    Refusal("random bytes after a TIFF header (.tif)",
            slide_args(lambda w: random_bytes(w / "noise.tif", n_bytes=500, prefix=b"II*\x00")),
            "noise.tif", "not a readable TIFF|TIFF holds no image"),
    Refusal("a TIFF cut in half", slide_args(lambda w: truncated_tiff(w / "cut.tif")),
            "cut.tif", "truncated|not a readable TIFF|missing"),
    Refusal("a pyramidal TIFF cut in half",
            slide_args(lambda w: truncated_tiff(w / "cut.tif", pyramid=True)),
            "cut.tif", "truncated|not a readable TIFF|missing"),
    Refusal("a JPEG cut in half",
            slide_args(lambda w: truncated_jpeg(w / "cut.jpg"), "--mpp", "0.5"), "cut.jpg",
            "cannot decode the image: image file is truncated"),
    Refusal("a tiled TIFF whose tile offsets point past the end",
            slide_args(lambda w: tiff_with_tile_offset_past_end(w / "offsets.tif")),
            "offsets.tif", r"pixel data end at byte \d+ but the file has \d+ bytes"),
    Refusal("a zero-sized image (TIFF)", slide_args(lambda w: zero_width_tiff(w / "zero.tif")),
            "zero.tif", r"no pixels|not a readable TIFF"),
    Refusal("a zero-sized image (OME-Zarr)",
            slide_args(lambda w: zarr_with_zero_sized_level(w / "zero.zarr")),
            "zero.zarr", "no pixels"),
    Refusal("float32 with NaN", slide_args(lambda w: float_tiff_with(w / "nan.tif", np.nan)),
            "nan.tif", "NaN or infinite pixel values"),
    Refusal("float32 with inf", slide_args(lambda w: float_tiff_with(w / "inf.tif", np.inf)),
            "inf.tif", "NaN or infinite pixel values"),
    Refusal("float32 with -inf at full resolution only (found mid-write)",
            slide_args(lambda w: float_tiff_with(w / "ninf.tif", -np.inf, level0_only=True)),
            "ninf.tif", r"NaN or infinite pixel values at level 0, rows \d+:\d+",
            store="incomplete"),
    Refusal("float64 with values beyond float32",
            slide_args(lambda w: plain_tiff(w / "huge.tif", 1e300 * synthetic_tissue(
                (200, 300), seed=8, rgb=False, dtype=np.float64))),
            "huge.tif", r"pixel values reach [\d.]+e\+\d+; the model works in float32"),
    # --- pixel size ---
    Refusal("missing mpp", slide_args(lambda w: ome_tiff_with_mpp(w / "nompp.ome.tif", None)),
            "nompp.ome.tif", r"no pixel size in the file \(pass --mpp\)"),
    Refusal("zero mpp", slide_args(lambda w: ome_tiff_with_mpp(w / "zero.ome.tif", 0.0)),
            "zero.ome.tif", r"pixel size in the file is 0 um/px.*\(pass --mpp\)"),
    Refusal("negative mpp", slide_args(lambda w: ome_tiff_with_mpp(w / "neg.ome.tif", -0.5)),
            "neg.ome.tif", r"pixel size in the file is -0.5 um/px"),
    Refusal("absurd mpp (1000 um/px)",
            slide_args(lambda w: ome_tiff_with_mpp(w / "huge.ome.tif", 1000.0)),
            "huge.ome.tif", r"pixel size in the file is 1000 um/px"),
    Refusal("absurd mpp (72 dpi default resolution)",
            slide_args(lambda w: plain_tiff(w / "dpi.tif", synthetic_tissue((64, 64), seed=3),
                                            mpp=25400 / 72)),
            "dpi.tif", "outside"),
    Refusal("zero mpp (OME-Zarr scale)",
            slide_args(lambda w: zarr_with_pixel_size(w / "zero.zarr", 0.0)), "zero.zarr",
            r"pixel size in the file is 0 um/px"),
    Refusal("negative mpp (OME-Zarr scale)",
            slide_args(lambda w: zarr_with_pixel_size(w / "neg.zarr", -0.5)), "neg.zarr",
            r"pixel size in the file is -0.5 um/px"),
    Refusal("mpp that is not a number (OME-Zarr scale)",
            slide_args(lambda w: zarr_with_pixel_size(w / "text.zarr", "half")), "text.zarr",
            r"scale \[1.0, 'half', 'half'\] is not numeric"),
    Refusal("zero --mpp", slide_args(rgb_slide, "--mpp", "0"), "--mpp", "not a credible"),
    Refusal("negative --mpp", slide_args(rgb_slide, "--mpp", "-0.5"), "--mpp", "not a credible"),
    Refusal("absurd --mpp", slide_args(rgb_slide, "--mpp", "1e6"), "--mpp", "not a credible"),
    Refusal("--mpp nan", slide_args(rgb_slide, "--mpp", "nan"), "--mpp", "not a credible"),
    Refusal("--mpp that is not a number", slide_args(rgb_slide, "--mpp", "half"), "--mpp",
            "not a valid float"),
    # --- OME-Zarr ---
    Refusal("OME-Zarr with a missing level",
            slide_args(lambda w: zarr_without_level(w / "holes.zarr")), "holes.zarr",
            "level 's1' listed in the metadata is missing"),
    Refusal("OME-Zarr with a corrupt chunk (in the level read first)",
            slide_args(lambda w: zarr_with_corrupt_chunk(w / "bad.zarr", in_thumbnail=True)),
            "bad.zarr", r"cannot read pixels at s1, rows \d+:\d+, columns \d+:\d+: Zstd"),
    Refusal("OME-Zarr with a corrupt chunk (found mid-write)",
            slide_args(lambda w: zarr_with_corrupt_chunk(w / "bad.zarr", in_thumbnail=False)),
            "bad.zarr", r"cannot read pixels at s0, rows \d+:\d+, columns \d+:\d+: Zstd",
            store="incomplete"),
    Refusal("OME-Zarr metadata that contradicts the arrays (scales)",
            slide_args(lambda w: edit_ome_metadata(ome_zarr_pyramid(w / "lies.zarr"), lambda ome:
                ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0].update(
                    scale=[1.0, 8.0, 8.0]))),
            "lies.zarr", "smaller than level 0 but its scale says"),
    Refusal("OME-Zarr metadata that contradicts the arrays (axes)",
            slide_args(lambda w: edit_ome_metadata(ome_zarr_pyramid(w / "lies.zarr"), lambda ome:
                ome["multiscales"][0]["axes"].insert(0, {"name": "t", "type": "time"}))),
            "lies.zarr", "has 3 dimensions but the axes are"),
    Refusal("OME-Zarr with an unknown NGFF version",
            slide_args(lambda w: edit_ome_metadata(ome_zarr_pyramid(w / "future.zarr"),
                                                   lambda ome: ome.update(version="0.7"))),
            "future.zarr", "OME-NGFF version '0.7' is not supported"),
    # --- output ---
    Refusal("output exists (no --overwrite)",
            lambda w, m: [str(rgb_slide(w)), str(existing_store(w))], "out.zarr",
            r"already exists \(pass --overwrite to replace it\)"),
    Refusal("output is a file",
            lambda w, m: [str(rgb_slide(w)), str(random_bytes(w / "out.zarr", n_bytes=64))],
            "out.zarr", "exists and is not a folder"),
    Refusal("output is a file (with --overwrite)",
            lambda w, m: [str(rgb_slide(w)), str(random_bytes(w / "out.zarr", n_bytes=64)),
                          "--overwrite"], "out.zarr", "exists and is not a folder"),
    Refusal("output is a folder of other files (with --overwrite)",
            lambda w, m: [str(rgb_slide(w)), str(foreign_folder(w)), "--overwrite"],
            "home", "non-empty folder that is not a zarr store; not replaced"),
    Refusal("output in a read-only folder",
            lambda w, m: [str(rgb_slide(w)), str(read_only_folder(w) / "out.zarr")],
            "out.zarr", r"folder .*locked is not writable", unprivileged=True),
    Refusal("output is the input store (with --overwrite)",
            lambda w, m: [str(ome_zarr_pyramid(w / "in.zarr")), "in.zarr", "--overwrite"],
            "in.zarr", "is the input slide; it would be destroyed"),
    Refusal("output inside the input store",
            lambda w, m: [str(ome_zarr_pyramid(w / "in.zarr")), "in.zarr/out.zarr"],
            "out.zarr", "lies inside the input .*in.zarr"),
    Refusal("input inside the output store (with --overwrite)",
            lambda w, m: [str(rgb_slide(existing_store(w))), "out.zarr", "--overwrite"],
            "out.zarr", "holds the input .*slide.tif; it would be deleted"),
    Refusal("output is a dangling symbolic link",
            lambda w, m: [str(rgb_slide(w)), str(link(w / "out.zarr", "/nonexistent/out.zarr"))],
            "out.zarr", r"is a symbolic link \(to /nonexistent/out.zarr\)"),
    Refusal("output is a symbolic link to a store (with --overwrite)",
            lambda w, m: [str(rgb_slide(w)), str(link(w / "link.zarr", existing_store(w).name)),
                          "--overwrite"], "link.zarr", r"is a symbolic link \(to out.zarr\)"),
    Refusal("output is a symbolic link to the input store (with --overwrite)",
            lambda w, m: [str(ome_zarr_pyramid(w / "in.zarr")), str(link(w / "o.zarr", "in.zarr")),
                          "--overwrite"], "o.zarr", "is the input slide"),
    Refusal("bad input with the output in a folder that does not exist yet",
            lambda w, m: [str(random_bytes(w / "empty.svs", n_bytes=0)), "new/sub/out.zarr"],
            "empty.svs", "the file is empty"),
    Refusal("disk fills up mid-write (1 MiB file-size limit)",
            lambda w, m: [str(noise_slide(w)), "out.zarr"], "out.zarr",
            r"write failed, disk full \(File too large\); the store is incomplete",
            store="incomplete", fsize_bytes=1 << 20),
    # --- model ---
    Refusal("corrupt ONNX file", with_model(broken_onnx), "broken.onnx",
            "not a readable ONNX model"),
    Refusal("truncated ONNX file", with_model(truncated_onnx), "cut.onnx",
            "not a readable ONNX model"),
    Refusal("ONNX file with an operator ONNX Runtime does not know",
            with_model(lambda w, m: make_unknown_op_model(w / "alien.onnx")), "alien.onnx",
            "cannot load the ONNX model"),
    Refusal("missing model file", with_model(lambda w, m: w / "gone.onnx"), "gone.onnx",
            "no such model file"),
    Refusal("unknown model name", with_model(lambda w, m: Path("deepr-he-1000x")),
            "deepr-he-1000x", r"unknown model \(available: .*deepr-he-20x"),
    Refusal("3-channel model on a 2-channel fluorescence slide",
            with_model(lambda w, m: m.rgb, lambda w: fluo_slide(w, 2)), "rgb.onnx",
            "the model takes 3 channels but the slide has 2"),
    Refusal("shipped brightfield model on a 5-channel fluorescence slide",
            with_model(lambda w, m: Path("deepr-he-20x"), lambda w: fluo_slide(w, 5)),
            "deepr-he-20x.onnx", "the model takes 3 channels but the slide has 5"),
    Refusal("2-channel model on an RGB slide",
            with_model(lambda w, m: make_identity_model(w / "two.onnx", channels=2)),
            "two.onnx", "the model takes 2 channels but the slide has 3"),
    Refusal("model card that contradicts its ONNX graph (3 vs 2 channels)",
            with_model(lambda w, m: card_beside(make_identity_model(w / "liar.onnx", channels=2),
                                                in_channels=3)),
            "liar.onnx", "the ONNX graph takes 2 channels but its card says 3"),
    Refusal("model that returns another channel count",
            with_model(lambda w, m: make_channel_mean_model(w / "mean.onnx", channels=3)),
            "mean.onnx", "the model returns 1 channel for 3 input channels"),
    # --- options ---
    Refusal("overlap >= tile/2", slide_args(rgb_slide, "--tile-px", "128", "--overlap-px", "64"),
            "--overlap-px", "64 px must be less than half the tile"),
    Refusal("tile below the network's minimum",
            slide_args(rgb_slide, "--tile-px", "8", "--overlap-px", "2"),
            "--tile-px", "8 px is below the model's minimum of 16 px"),
    Refusal("absurd tile (one tile would not fit in memory)",
            slide_args(rgb_slide, "--tile-px", "100000"), "--tile-px",
            "100000 px is above the largest tile of 8192 px"),
    Refusal("tile of 0 px", slide_args(rgb_slide, "--tile-px", "0"), "--tile-px",
            r"0 is not in the range x>=1"),
    Refusal("unknown NGFF version for the output", slide_args(rgb_slide, "--ngff", "0.6"),
            "--ngff", "'0.6' is not one of '0.4', '0.5'"),
    Refusal("missing output argument", lambda w, m: [str(rgb_slide(w))], "OUTPUT",
            "missing argument"),
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    folder = tmp_path_factory.mktemp("models")
    return Models(
        any=make_identity_model(folder / "any.onnx", channels=None),
        rgb=make_identity_model(folder / "rgb.onnx", channels=3),
        grey=make_identity_model(folder / "grey.onnx", channels=1),
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(r, id=r.case, marks=[pytest.mark.xfail(reason=r.known_bug, strict=True)])
        if r.known_bug
        else pytest.param(r, id=r.case)
        for r in REFUSALS
    ],
)
def test_hostile_input_is_refused_cleanly(tmp_path: Path, models: Models, case: Refusal) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = case.make(work, models)
    if "--model" not in args:
        args += ["--model", str(models.any)]
    before = snapshot(work)
    try:
        done = run_cli(
            ["run", *args, "--device", "cpu"],
            work,
            fsize_bytes=case.fsize_bytes,
            unprivileged=case.unprivileged,
        )
    finally:
        for folder in work.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o700)

    assert done.returncode == case.code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(PREFIX), lines[0]
    subject, _, problem = lines[0].removeprefix(PREFIX).partition(": ")
    assert subject == case.subject or subject.endswith("/" + case.subject), lines[0]
    assert re.search(case.problem, problem), lines[0]
    assert done.stdout == ""

    after = snapshot(work)
    if case.store == "none":
        assert after == before, "the run changed or left files"
    else:
        out = work / "out.zarr"
        assert_incomplete_store(out)
        assert {k: v for k, v in after.items() if not k.startswith("out.zarr")} == before


def test_read_only_folder_is_really_read_only_to_the_cli(tmp_path: Path) -> None:
    """The read-only case above is real even for root: the process cannot write there."""
    locked = read_only_folder(tmp_path)
    try:
        done = run_cli(
            [],
            tmp_path,
            unprivileged=True,
            python_args=("-c", "open('locked/probe', 'w')"),
        )
    finally:
        locked.chmod(0o700)
    assert done.returncode == 1 and "PermissionError" in done.stderr, done.stderr
    assert not (locked / "probe").exists()


# --- inputs that must be processed, bit for bit -----------------------------------------


@dataclass(frozen=True, slots=True)
class Success:
    """An odd but valid input: the identity model must give back exactly the input."""

    case: str
    """The case, in the issue's words."""
    image_cyx: Callable[[], np.ndarray]
    """Level 0 as written."""
    write: Callable[[Path, np.ndarray], Path]
    """Writes the image into the work folder."""
    model: str = "any"
    """Which of :class:`Models`."""
    extra: tuple[str, ...] = ()
    """More options."""
    expected: Callable[[np.ndarray], np.ndarray] = lambda image: image
    """Level 0 of the output from the image written."""


def grey_1x1() -> np.ndarray:
    return np.full((1, 1, 1), 7, np.uint8)


def rgb_1x1() -> np.ndarray:
    return np.array([200, 100, 50], np.uint8).reshape(3, 1, 1)


def rgba() -> np.ndarray:
    rgb = synthetic_tissue((300, 200), seed=4)
    alpha = np.random.default_rng(4).integers(0, 256, (1, 300, 200), dtype=np.uint8)
    return np.concatenate([rgb, alpha])


def fluo(n_channels: int) -> Callable[[], np.ndarray]:
    return lambda: synthetic_tissue(
        (300, 200), seed=5, rgb=False, n_channels=n_channels, dtype=np.uint16
    )


def tiff(name: str) -> Callable[[Path, np.ndarray], Path]:
    return lambda w, image: plain_tiff(w / name, image)


def png(name: str) -> Callable[[Path, np.ndarray], Path]:
    return lambda w, image: make_png(w / name, image)


MODEL_PATH = ("--no-tissue-mask",)
"""Send even a background pixel through the model."""

SUCCESSES: list[Success] = [
    Success("1x1 grey image", grey_1x1, tiff("one.tif"), extra=MODEL_PATH),
    Success("1x1 RGB image", rgb_1x1, tiff("one_rgb.tif"), model="rgb", extra=MODEL_PATH),
    Success("1x1 PNG", rgb_1x1, png("one.png"), model="rgb", extra=(*MODEL_PATH, "--mpp", "0.5")),
    Success("1,000,000 x 1 strip", lambda: one_pixel_strip(STRIP_PX), tiff("strip.tif")),
    Success("1 x 1,000,000 strip (one column)",
            lambda: one_pixel_strip(STRIP_PX, vertical=True), tiff("column.tif")),
    Success("RGBA (alpha dropped)", rgba, tiff("rgba.tif"), model="rgb",
            expected=lambda image: image[:3]),
    Success("RGBA PNG (alpha dropped)", rgba, png("rgba.png"), model="rgb",
            extra=("--mpp", "0.5"), expected=lambda image: image[:3]),
    Success("16-bit RGB", lambda: synthetic_tissue((300, 200), seed=6).astype(np.uint16) * 257,
            tiff("rgb16.tif"), model="rgb"),
    Success("int16 fluorescence with negative values",
            lambda: (fluo(2)().astype(np.int32) - 30000).astype(np.int16), tiff("signed.tif")),
    Success("2-channel fluorescence, 1-channel model (channel by channel)", fluo(2),
            tiff("fluo2.tif"), model="grey"),
    Success("5-channel fluorescence, 1-channel model (channel by channel)", fluo(5),
            tiff("fluo5.tif"), model="grey"),
    Success("5-channel fluorescence, 5-channel model", fluo(5), tiff("fluo5.tif")),
]  # fmt: skip

MAX_RSS_MB = 512
"""Peak memory allowed for any of these runs (a 1-pixel run takes about 150 MB)."""


@pytest.mark.parametrize("case", SUCCESSES, ids=[s.case for s in SUCCESSES])
def test_odd_but_valid_input_is_refocused_bit_for_bit(
    tmp_path: Path, models: Models, case: Success
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    image = case.image_cyx()
    slide = case.write(work, image)
    before = snapshot(work)
    model = getattr(models, case.model)
    done = run_cli(
        ["run", str(slide), "out.zarr", "--model", str(model), "--device", "cpu", *case.extra],
        work,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("refocused ") and len(done.stdout.splitlines()) == 1
    assert is_complete(work / "out.zarr")
    level0 = np.asarray(zarr.open_group(str(work / "out.zarr"), mode="r")["s0"])
    expected = case.expected(image)
    assert level0.dtype == expected.dtype
    np.testing.assert_array_equal(level0, expected)
    after = snapshot(work)
    assert {k: v for k, v in after.items() if not k.startswith("out.zarr")} == before
    assert done.max_rss_mb < MAX_RSS_MB
