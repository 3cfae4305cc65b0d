"""``wsi-deepr batch``: inputs, lost workers on a real cluster, failed slides, the record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from slides import make_tiff_slide, synthetic_tissue
from tiny_models import make_identity_model, make_slow_identity_model

from wsi_deepr.batch import (
    BATCH_JSON,
    BatchResult,
    SlideRecord,
    format_summary,
    run_batch,
    write_record,
)
from wsi_deepr.batch_inputs import SlideJob, collect_jobs, output_name
from wsi_deepr.errors import ConfigError, InputError, OptionError, OutputError
from wsi_deepr.run import refocus_slide
from wsi_deepr.writer import is_complete

MPP = 0.5


# ----------------------------------------------------------------------------- inputs
def test_output_names_drop_format_suffixes():
    assert output_name("/a/b/slide-1.svs") == "slide-1.zarr"
    assert output_name("x.ome.tif") == "x.zarr"
    assert output_name("store.ome.zarr/") == "store.zarr"
    assert output_name("plain") == "plain.zarr"


def test_paths_globs_and_manifests_give_one_job_per_slide(tmp_path):
    for name in ("a.tif", "b.tif", "c.svs", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.tif").write_bytes(b"x")
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "slide,output,mpp,model\n"
        "d.png,custom/d-out.zarr,0.25,m.onnx\n"
        "sub/e.tif,,,\n"
        "\n"
        f"{tmp_path / 'c.svs'},,,\n"
    )
    jobs = collect_jobs(
        [str(tmp_path / "*.tif"), str(manifest), str(tmp_path / "a.tif")],
        tmp_path / "out",
        model="default-model",
    )
    out = (tmp_path / "out").absolute()
    assert [Path(j.slide).name for j in jobs] == ["a.tif", "b.tif", "d.png", "e.tif", "c.svs"]
    by_name = {Path(j.slide).name: j for j in jobs}
    assert by_name["a.tif"] == SlideJob(
        str(tmp_path / "a.tif"), out / "a.zarr", None, "default-model"
    )
    assert by_name["d.png"] == SlideJob(
        str(tmp_path / "d.png"), out / "custom" / "d-out.zarr", 0.25, "m.onnx"
    )
    assert by_name["e.tif"].slide == str(tmp_path / "sub" / "e.tif")  # relative to the manifest
    assert by_name["e.tif"].model == "default-model" and by_name["e.tif"].mpp is None


@pytest.mark.parametrize(
    ("rows", "error", "where", "problem"),
    [
        ("slide,mpp\nmissing.tif,\n", ConfigError, "list.csv:2", "does not exist"),
        ("slide,mpp\na.tif,fast\n", ConfigError, "list.csv:2", "not a number"),
        ("slide,mpp\na.tif,-1\n", ConfigError, "list.csv:2", "positive"),
        ("slide,colour\na.tif,red\n", ConfigError, "list.csv", "unknown column(s) colour"),
        ("path\na.tif\n", ConfigError, "list.csv", "'slide' column"),
        ("slide,output\na.tif,x.zarr\nb.tif,x.zarr\n", ConfigError, "x.zarr", "both"),
    ],
)
def test_bad_manifests_name_the_row_and_the_problem(tmp_path, rows, error, where, problem):
    for name in ("a.tif", "b.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.csv").write_text(rows)
    with pytest.raises(error) as caught:
        collect_jobs([str(tmp_path / "list.csv")], tmp_path / "out")
    assert where in caught.value.subject and problem in caught.value.one_line()


def test_missing_paths_and_empty_globs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        collect_jobs([str(tmp_path / "nope.svs")], tmp_path / "out")
    with pytest.raises(InputError, match="matches no file"):
        collect_jobs([str(tmp_path / "*.svs")], tmp_path / "out")
    (tmp_path / "a.tif").write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.tif").write_bytes(b"x")
    with pytest.raises(ConfigError, match="both"):
        collect_jobs([str(tmp_path / "**" / "a.tif")], tmp_path / "out")


def test_contradicting_options_are_refused_before_any_work(tmp_path):
    job = SlideJob("s.tif", tmp_path / "s.zarr")
    with pytest.raises(OptionError, match="--overwrite"):
        run_batch([job], overwrite=True, resume=True)
    with pytest.raises(OptionError, match="--scheduler"):
        run_batch([job], scheduler="tcp://127.0.0.1:1", workers=2)
    assert not (tmp_path / "s.zarr").exists()


def test_summary_and_exit_code_follow_the_records():
    def record(status, code=0, area=None, seconds=None):
        return SlideRecord(f"/s/{status}{code}.tif", "o", status, error="bad" if code else None,
                           exit_code=code, area_mm2=area, seconds=seconds)  # fmt: skip

    result = BatchResult(
        [record("done", area=2.0, seconds=4.0), record("skipped", area=1.0), record("failed", 2)],
        seconds=10.0, scheduler="tcp://x", worker_threads=2, slides_in_flight=3,
    )  # fmt: skip
    assert result.exit_code == 2 and result.area_mm2_done == 2.0
    assert result.s_per_mm2 == 5.0 and result.slides_per_hour == 360.0
    lines = format_summary(result).splitlines()
    assert len(lines) == 5 and lines[0].split()[:2] == ["slide", "status"]
    assert lines[3].split()[:2] == ["failed2.tif", "failed"] and lines[3].endswith("bad")
    assert lines[-1].startswith("3 slides: 1 done, 1 failed, 1 skipped; 2.00 mm2 in 10.0 s")
    result.records.append(record("failed", 1))
    assert result.exit_code == 1
    result.records[:] = [record("done", area=1.0, seconds=1.0)]
    assert result.exit_code == 0


def test_batch_record_replaces_the_old_one_whole_and_leaves_no_temporary_file(tmp_path):
    done = SlideRecord("/s/a.tif", "o", "done", area_mm2=1.0, seconds=2.0)
    result = BatchResult([done], 3.0, "tcp://x", worker_threads=1, slides_in_flight=1)
    target = tmp_path / BATCH_JSON
    target.write_text("old")
    write_record(result, target)
    record = json.loads(target.read_text())
    assert record["counts"] == {"done": 1, "failed": 0, "skipped": 0}
    assert record["slides"][0]["seconds"] == 2.0 and record["s_per_mm2"] == 3.0
    assert [p.name for p in tmp_path.iterdir()] == [BATCH_JSON]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write the batch record"):
        write_record(result, tmp_path / "file" / BATCH_JSON)


# ------------------------------------------------------------------------ lost workers
def all_levels(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    paths = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    return {path: np.asarray(group[path]) for path in paths}


RUN_DEPENDENT = {"scheduler", "workers", "ort_threads"}
"""Parameters that name how the graph ran, not what it computed."""
TIMINGS = {"seconds", "model_seconds", "pyramid_seconds", "s_per_mm2", "s_per_mm2_tissue",
           "tiles_per_s"}  # fmt: skip


def comparable_metadata(store: Path) -> tuple[dict, dict]:
    """Group attributes and report.json without timings, paths and scheduler details."""
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    record = dict(attrs.pop("wsi_deepr"))
    record.pop("timings")
    record["parameters"] = {k: v for k, v in record["parameters"].items() if k not in RUN_DEPENDENT}
    report = json.loads((store / "report.json").read_text())
    report = {k: v for k, v in report.items()
              if k not in TIMINGS | RUN_DEPENDENT | {"output_path"}}  # fmt: skip
    return {**attrs, "wsi_deepr": record}, report


def level0_chunks_written(out: Path) -> int:
    return sum(1 for p in out.glob("*.zarr/s0/c/**/*") if p.is_file())


def test_a_worker_killed_mid_batch_loses_no_slide(tmp_path):
    from distributed import Client, LocalCluster

    slides = []
    for k in range(3):
        image = synthetic_tissue((1100, 1300), seed=20 + k)
        slides.append((make_tiff_slide(tmp_path / f"s{k}.tif", image, MPP, tile=128), image))
    model = make_slow_identity_model(tmp_path / "slow.onnx", rounds=16)
    options = dict(model=str(model), tile_px=128, overlap_px=16, chunk_px=224,
                   tissue_mask=False, device="cpu")  # fmt: skip
    jobs = collect_jobs([str(tmp_path / "s*.tif")], tmp_path / "out")
    n_chunks = len(jobs) * 5 * 6  # ceil(1100 / 224) x ceil(1300 / 224) per slide

    with (
        LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(2)
        pids_before = client.run(os.getpid)
        outcome: dict[str, object] = {}
        batch = threading.Thread(
            target=lambda: outcome.update(result=run_batch(jobs, scheduler=client, **options))
        )
        batch.start()
        deadline = time.monotonic() + 120
        while level0_chunks_written(tmp_path / "out") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = [w for w, keys in client.processing().items() if keys] or list(pids_before)
        victim = pids_before[busy[0]]
        os.kill(victim, signal.SIGKILL)
        written_at_kill = level0_chunks_written(tmp_path / "out")
        assert batch.is_alive(), "the batch ended before the kill: make the job longer"
        batch.join(timeout=300)
        pids_after = client.run(os.getpid)

    assert 0 < written_at_kill < n_chunks, "the kill did not land mid-job"
    assert victim not in pids_after.values(), "the killed worker is still there"
    result = outcome["result"]
    assert isinstance(result, BatchResult)
    assert [r.status for r in result.records] == ["done"] * 3, result.records
    assert result.exit_code == 0

    for (path, image), job in zip(slides, jobs, strict=True):
        reference = tmp_path / "reference" / job.output.name
        refocus_slide(path, reference, **options)  # the local threaded scheduler
        assert is_complete(job.output)
        got, want = all_levels(job.output), all_levels(reference)
        assert list(got) == list(want) and len(got) == 2  # a real pyramid
        for name in want:
            assert np.array_equal(got[name], want[name]), f"{job.output}/{name} differs"
        np.testing.assert_array_equal(got["s0"], image)  # identity model: the slide itself
        assert comparable_metadata(job.output) == comparable_metadata(reference)


# ---------------------------------------------------------- corrupt slide, via the CLI
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_deepr", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_batch_with_a_corrupt_slide_finishes_the_others_and_exits_2(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for k in range(4):
        image = synthetic_tissue((300, 400), seed=30 + k)
        make_tiff_slide(inbox / f"good{k}.tif", image, MPP, tile=128, pyramid=False)
    good = (inbox / "good0.tif").read_bytes()
    (inbox / "bad.tif").write_bytes(good[: len(good) // 3])  # truncated mid-pixels
    model = make_identity_model(tmp_path / "identity.onnx")
    out = tmp_path / "out"
    args = ["batch", str(inbox / "*.tif"), "--out", str(out), "--model", str(model),
            "--tile-px", "128", "--overlap-px", "16", "--workers", "2"]  # fmt: skip

    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    record = json.loads((out / BATCH_JSON).read_text())
    assert record["counts"] == {"done": 4, "failed": 1, "skipped": 0}
    assert record["exit_code"] == 2
    by_name = {Path(s["slide"]).name: s for s in record["slides"]}
    bad = by_name.pop("bad.tif")
    assert bad["status"] == "failed" and str(inbox / "bad.tif") in bad["error"]
    assert "truncated" in bad["error"] and bad["exit_code"] == 2
    assert not is_complete(out / "bad.zarr")
    for name, slide in by_name.items():
        assert slide["status"] == "done" and is_complete(slide["output"]), name
        assert slide["area_mm2"] == pytest.approx(300 * 400 * MPP**2 / 1e6)
        assert slide["s_per_mm2"] > 0 and slide["provider"] == "CPUExecutionProvider"
    table = done.stdout.strip().splitlines()
    assert len(table) == 1 + 5 + 1, done.stdout
    rows = {line.split()[0]: line for line in table[1:-1]}
    assert rows["bad.tif"].split()[1] == "failed" and bad["error"] in rows["bad.tif"]
    assert all(rows[f"good{k}.tif"].split()[1] == "done" for k in range(4))
    assert table[-1].startswith("5 slides: 4 done, 1 failed, 0 skipped")

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("good*.zarr/zarr.json")}
    again = cli(*args)
    assert again.returncode == 2, again.stderr
    record = json.loads((out / BATCH_JSON).read_text())
    assert record["counts"] == {"done": 0, "failed": 1, "skipped": 4}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # complete outputs untouched


# ------------------------------------------------------------------------------ resume
def test_batch_resume_continues_a_killed_run_and_skips_finished_slides(tmp_path):
    """A `wsi-deepr run` killed mid-slide: the batch refuses it without --resume, then
    resumes it (reusing its stored chunks) next to a new slide and a finished one."""
    images = {name: synthetic_tissue((1100, 1100), seed=40 + k) for k, name in enumerate("abc")}
    paths = {
        n: make_tiff_slide(tmp_path / f"{n}.tif", im, MPP, tile=128) for n, im in images.items()
    }
    model = make_slow_identity_model(tmp_path / "slow.onnx", rounds=24)
    options = dict(model=str(model), tile_px=128, overlap_px=16, chunk_px=224,
                   tissue_mask=False, device="cpu")  # fmt: skip
    out = tmp_path / "out"
    refocus_slide(paths["c"], out / "c.zarr", **options)  # finished before the batch
    finished_stamp = (out / "c.zarr" / "report.json").stat().st_mtime_ns

    run = subprocess.Popen(
        [sys.executable, "-m", "wsi_deepr", "run", str(paths["a"]), str(out / "a.zarr"),
         "--model", str(model), "--tile-px", "128", "--overlap-px", "16", "--chunk-px", "224",
         "--no-tissue-mask", "--device", "cpu", "--workers", "1", "--quiet"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    markers = out / "a.zarr" / "wsi_deepr_progress"
    deadline = time.monotonic() + 120
    while len(list(markers.glob("done-*"))) < 3 and time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not is_complete(out / "a.zarr")

    jobs = collect_jobs([str(tmp_path / "*.tif")], out)
    refused = run_batch(jobs, workers=1, **options)
    assert [r.status for r in refused.records] == ["failed", "done", "skipped"]
    assert "--resume" in (refused.records[0].error or "") and refused.exit_code == 2

    resumed = run_batch(jobs, workers=1, resume=True, record_path=out / BATCH_JSON, **options)
    assert [r.status for r in resumed.records] == ["done", "skipped", "skipped"]
    assert resumed.exit_code == 0
    reused = resumed.records[0].chunks_reused
    assert reused is not None and 3 <= reused < 25, reused  # 5 x 5 chunks
    extra = (resumed.records[0].report or {})["extra"]
    assert extra["chunks_computed"] == 25 - reused
    assert json.loads((out / BATCH_JSON).read_text())["slides"][0]["chunks_reused"] == reused
    assert (out / "c.zarr" / "report.json").stat().st_mtime_ns == finished_stamp
    for name, image in images.items():
        assert is_complete(out / f"{name}.zarr")
        np.testing.assert_array_equal(all_levels(out / f"{name}.zarr")["s0"], image)
    reference = tmp_path / "reference.zarr"
    refocus_slide(paths["a"], reference, **options)
    got, want = all_levels(out / "a.zarr"), all_levels(reference)
    assert all(np.array_equal(got[k], want[k]) for k in want) and list(got) == list(want)


def test_cli_batch_attaches_to_a_running_scheduler(tmp_path):
    """The documented cluster path: `dask worker`s already up, `--scheduler ADDRESS`."""
    from distributed import Client, LocalCluster

    for k in range(2):
        image = synthetic_tissue((300, 400), seed=50 + k)
        make_tiff_slide(tmp_path / f"s{k}.tif", image, MPP, tile=128, pyramid=False)
    model = make_identity_model(tmp_path / "identity.onnx")
    with (
        LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        done = cli("batch", str(tmp_path / "s*.tif"), "--out", str(tmp_path / "out"),
                   "--model", str(model), "--tile-px", "128", "--overlap-px", "16",
                   "--scheduler", cluster.scheduler_address)  # fmt: skip
        workers_seen = set(client.run(os.getpid).values())
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / BATCH_JSON).read_text())
    assert record["scheduler"] == cluster.scheduler_address and record["worker_threads"] == 2
    assert record["counts"] == {"done": 2, "failed": 0, "skipped": 0}
    assert all(s["report"]["scheduler"] == cluster.scheduler_address for s in record["slides"])
    assert len(workers_seen) == 2  # the cluster outlived the batch (not closed by it)
