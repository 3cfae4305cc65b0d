"""``pipelines/inbox_job.py``: each run refocuses only new slides; a held lock stops a run."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from slides import make_tiff_slide, synthetic_tissue
from tiny_models import make_identity_model

from wsi_deepr.writer import is_complete

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "inbox_job.py"


def inbox_job(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )


def add_slide(inbox: Path, name: str, seed: int, *, age_s: float = 600.0) -> Path:
    path = make_tiff_slide(
        inbox / name, synthetic_tissue((300, 400), seed=seed), 0.5, tile=128, pyramid=False
    )
    stamp = path.stat().st_mtime - age_s  # copied in a while ago
    os.utime(path, (stamp, stamp))
    return path


def test_second_run_refocuses_only_the_new_slide_and_a_held_lock_stops_a_run(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    add_slide(inbox, "a.tif", 1)
    add_slide(inbox, "b.tif", 2)
    (inbox / "notes.txt").write_text("not a slide")
    (inbox / "c.tif.part").write_bytes(b"being copied")
    model = make_identity_model(tmp_path / "identity.onnx")
    args = ["--inbox", str(inbox), "--out", str(out), "--", "--model", str(model),
            "--tile-px", "128", "--overlap-px", "16", "--workers", "1"]  # fmt: skip

    first = inbox_job(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "batch.json").read_text())["counts"]["done"] == 2
    assert is_complete(out / "a.zarr") and is_complete(out / "b.zarr")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.zarr/report.json")}

    add_slide(inbox, "c.tif", 3)
    add_slide(inbox, "d.tif", 4, age_s=0.0)  # still arriving: left for the next run
    second = inbox_job("--settle-s", "60", *args)
    assert second.returncode == 0, second.stderr
    assert "1 new slides (2 done before)" in second.stderr
    record = json.loads((out / "batch.json").read_text())
    assert [Path(s["slide"]).name for s in record["slides"]] == ["c.tif"]
    assert record["counts"] == {"done": 1, "failed": 0, "skipped": 0}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # done slides untouched
    assert is_complete(out / "c.zarr") and not (out / "d.zarr").exists()

    with open(out / ".inbox_job.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        blocked = inbox_job("--settle-s", "0", *args)
    assert blocked.returncode == 0 and "another run holds" in blocked.stderr
    assert not (out / "d.zarr").exists()

    last = inbox_job("--settle-s", "0", *args)
    assert last.returncode == 0 and "1 new slides (3 done before)" in last.stderr, last.stderr
    assert is_complete(out / "d.zarr")
    idle = inbox_job(*args)
    assert (
        idle.returncode == 0 and "nothing new" in idle.stderr and "(4 slides done)" in idle.stderr
    )
