"""Benchmark ``wsi-deepr batch``: slides/hour and s/mm2 with 1, 2, ... local workers.

Generates ``--slides`` square RGB slides (the JPEG-tiled pyramidal TIFFs of
``bench_run.py``, 0.325 um/px, tissue everywhere), then runs the same batch through the
command line once per ``--workers`` value, each into a fresh output folder (cluster start
included, as a user sees it), and prints per run: wall time, slides/hour, batch s/mm2 (wall
time over the area refocused) and the mean per-slide s/mm2 (slides overlap in time, so
the per-slide figure grows with the slides in flight while the batch figure falls), and the
CPU seconds the batch and its workers used (the work done, whatever else runs on the
machine; compare it with wall time x cores to see contention).

    python pipelines/bench_batch.py                                   # 6 slides of 1536 px
    python pipelines/bench_batch.py --slides 8 --size-px 2048 --workers 1 2 4
    python pipelines/bench_batch.py --model path/to/model.onnx --tile-px 256

The model is the shipped brightfield model by default (``bench_run.default_model``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_run import default_model, make_slide


def run_batch_cli(
    slides: list[Path], out: Path, *, workers: int, model: Path, extra: list[str]
) -> dict[str, Any]:
    """Run ``wsi-deepr batch`` in a child process; returns its batch.json and wall time."""
    command = [sys.executable, "-m", "wsi_deepr", "batch", *map(str, slides), "--out", str(out),
               "--model", str(model), "--workers", str(workers), "--quiet", *extra]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"bench_batch: batch failed ({done.returncode}):\n{done.stderr}")
    record: dict[str, Any] = json.loads((out / "batch.json").read_text())
    record["process_wall_s"] = wall_s
    # CPU seconds of the batch and its worker processes (reaped, so counted): on a shared
    # machine this shows the work done, which wall time under contention does not.
    record["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return record


def main(argv: list[str] | None = None) -> int:
    """Generate slides, run the batch per worker count, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=6, help="number of slides")
    parser.add_argument("--size-px", type=int, default=1536, help="slide edge in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="local worker processes to compare")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None, help="ONNX model")
    parser.add_argument("--workdir", type=Path, default=None, help="keep slides here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args, extra = parser.parse_known_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model, model_note = (args.model, str(args.model)) if args.model else default_model(workdir)
        slides = [make_slide(workdir / f"slide{k}.tif", args.size_px) for k in range(args.slides)]
        print(f"{len(slides)} slides of {args.size_px} px, model {model_note}, "
              f"batch options {extra or 'default'}")  # fmt: skip
        rows = []
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            record = run_batch_cli(slides, out, workers=workers, model=model, extra=extra)
            per_slide = [s["s_per_mm2"] for s in record["slides"] if s["s_per_mm2"]]
            rows.append({
                "workers": workers,
                "slides": record["counts"]["done"],
                "area_mm2": record["area_mm2_done"],
                "batch_s": record["seconds"],
                "process_s": record["process_wall_s"],
                "slides_per_hour": record["slides_per_hour"],
                "s_per_mm2": record["s_per_mm2"],
                "slide_s_per_mm2_mean": sum(per_slide) / len(per_slide),
                "slides_in_flight": record["slides_in_flight"],
                "cpu_s": record["cpu_s"],
                "provider": record["slides"][0]["provider"],
            })  # fmt: skip
    print(f"{'workers':>7} {'slides':>6} {'mm2':>6} {'batch s':>8} {'process s':>9} "
          f"{'slides/h':>9} {'s/mm2':>7} {'slide s/mm2':>11} {'cpu s':>7} "
          f"{'cpu s/mm2':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['workers']:>7} {r['slides']:>6} {r['area_mm2']:>6.2f} {r['batch_s']:>8.1f} "
              f"{r['process_s']:>9.1f} {r['slides_per_hour']:>9.1f} {r['s_per_mm2']:>7.2f} "
              f"{r['slide_s_per_mm2_mean']:>11.2f} {r['cpu_s']:>7.1f} "
              f"{r['cpu_s'] / r['area_mm2']:>9.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
