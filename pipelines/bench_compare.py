"""Side-by-side benchmark (issue 8): wsi-deepr against what a user would build instead.

On the same generated slide (RGB, 0.325 um/px, tissue everywhere; ``bench_run.make_slide``)
and, for each contender, in a child process of its own (so each peak RSS is its own):

a. wsi-deepr end to end (read, infer, blend, write the pyramid) with ``--model``,
   ``--tile-px`` and ``--overlap-px``, at every size;
b. the pure model time: as many tiles through the same sessions from memory (no I/O, no
   blending), with the run's parallelism (``bench_run.child_pure``);
c. a naive loop a user would write: OpenSlide ``read_region`` per tile, ``session.run``
   one tile at a time, per-tile normalisation, accumulate with uniform weights, save a
   BigTIFF (first size only: it holds the whole slide as float32 twice);
d. MONAI ``sliding_window_inference`` with Gaussian blending over the same ONNX session
   (wrapped as the predictor), the whole slide read into memory first as a user would,
   at every size;
e. ``wsi-deepr run SLIDE OUT.zarr`` with no tuning flags (default model, tile, overlap),
   at every size.

It prints s/mm2, tiles/s and peak RSS of each (and CPU seconds per mm2 of all threads: a
guide on a shared machine, though the spinning ORT thread pools of c and d count as work),
the ratios (a)/(b), (c)/(a), (d)/(a), (c)/(e) at the first size, and the model's achieved
GFLOP/s (MACs counted from the ONNX graph, :func:`wsi_deepr.model_cost.count_macs`)
against numpy's sgemm GFLOP/s with as many threads as the run uses. The rows also go to
``--json`` (default ``WORKDIR/compare.json``).

    python pipelines/bench_compare.py --sizes 8192 16384 --model models/deepr-he-20x.onnx
    python pipelines/bench_compare.py --sizes 2048 3072 --max-pure-tiles 16   # smoke run

``--variant MODEL`` (with ``--variant-tile-px``) adds (v): wsi-deepr with another model,
e.g. an int8 variant, and the ratio (c)/(v). ``--only ab`` runs a subset. MONAI needs the
``bench`` extra (``pip install -e '.[bench]'``).

``--device cuda|tensorrt`` and ``--precision fp32|fp16`` run (a), (b) and (e) there and so
(the naive loop and MONAI keep the best device and plain sessions); the rows then name the
provider, precision and GPU, and the numpy sgemm comparison is left out:

    python pipelines/bench_compare.py --sizes 8192 --only abe --device cuda --precision fp16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import (  # a sibling script, not a package
    MPP,
    child_pure,
    child_run,
    cpu_seconds,
    default_model,
    make_slide,
    peak_rss_mb,
    run_child,
)

CONTENDERS = "abcde"


# ----------------------------------------------------------------------------- children
def _session(model: str) -> Any:
    """The ONNX Runtime session a user would open: default options, best device."""
    import onnxruntime as ort

    from wsi_deepr.inference import CPU, select_provider

    provider = select_provider("auto")
    providers = [provider] if provider == CPU else [provider, CPU]
    return ort.InferenceSession(model, providers=providers)


def _save_rgb(path: str, rgb_yx3: np.ndarray) -> None:
    """What a user saves: one tiled, uncompressed BigTIFF (no pyramid)."""
    import tifffile

    tifffile.imwrite(path, rgb_yx3, bigtiff=True, tile=(512, 512), photometric="rgb")


def child_naive(slide: str, out: str, model: str, tile_px: int, overlap_px: int) -> None:
    """A hand-written loop: read_region, normalise, session.run, accumulate, save."""
    import openslide

    from wsi_deepr.tiling import TileGrid

    started = time.perf_counter()
    handle = openslide.OpenSlide(slide)
    width, height = handle.dimensions
    session = _session(model)
    name = session.get_inputs()[0].name
    grid = TileGrid(tile_px, overlap_px)  # the same tile positions as wsi-deepr's
    tile_h, tile_w = grid.tile_len(height), grid.tile_len(width)
    acc = np.zeros((3, height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    tiles = 0
    for y in grid.origins(height):
        for x in grid.origins(width):
            region = handle.read_region((int(x), int(y)), 0, (tile_w, tile_h))
            tile = np.asarray(region)[..., :3].transpose(2, 0, 1).astype(np.float32)
            mean = tile.mean(axis=(1, 2), keepdims=True)
            std = tile.std(axis=(1, 2), keepdims=True) + 1e-6
            (pred,) = session.run(None, {name: ((tile - mean) / std)[None]})
            acc[:, y : y + tile_h, x : x + tile_w] += pred[0] * std + mean
            count[y : y + tile_h, x : x + tile_w] += 1.0
            tiles += 1
    acc /= count
    rgb = np.clip(np.rint(acc), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    _save_rgb(out, rgb)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "tiles_run": tiles, "peak_rss_mb": peak_rss_mb(),
                      "cpu_seconds": cpu_seconds(),
                      "area_mm2": width * height * MPP**2 / 1e6}))  # fmt: skip


def child_monai(
    slide: str, out: str, model: str, tile_px: int, overlap_px: int, batch_size: int
) -> None:
    """MONAI sliding_window_inference, Gaussian blending, on the slide held in memory."""
    import tifffile
    import torch
    from monai.inferers import sliding_window_inference

    started = time.perf_counter()
    image = tifffile.imread(slide, level=0)  # (y, x, 3) uint8: the whole slide
    height, width = image.shape[:2]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    del image
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    x -= mean
    x /= std
    session = _session(model)
    name = session.get_inputs()[0].name
    tiles = [0]

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        tiles[0] += int(batch.shape[0])
        (pred,) = session.run(None, {name: batch.numpy()})
        return torch.from_numpy(pred)

    with torch.no_grad():
        y = sliding_window_inference(
            x, roi_size=(tile_px, tile_px), sw_batch_size=batch_size, predictor=predictor,
            overlap=overlap_px / tile_px, mode="gaussian", progress=False,
        )  # fmt: skip
    del x
    assert isinstance(y, torch.Tensor)
    y = y * std + mean
    rgb = y[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    _save_rgb(out, rgb)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "tiles_run": tiles[0], "peak_rss_mb": peak_rss_mb(),
                      "cpu_seconds": cpu_seconds(),
                      "area_mm2": width * height * MPP**2 / 1e6}))  # fmt: skip


def child_defaults(slide: str, out: str, device: str = "auto", precision: str = "auto") -> None:
    """``wsi-deepr run SLIDE OUT --overwrite --quiet``: what a user gets without tuning
    (plus ``--device`` and ``--precision`` where the benchmark names them)."""
    from wsi_deepr.cli import main
    from wsi_deepr.report import Report

    named = zip(("--device", "--precision"), (device, precision), strict=True)
    flags = [part for flag, value in named if value != "auto" for part in (flag, value)]
    try:
        main(["run", slide, out, "--overwrite", "--quiet", *flags])
    except SystemExit as exc:  # click ends its command with SystemExit(0)
        if exc.code:
            raise
    values = Report.read(Path(out) / "report.json").to_dict()
    values["peak_rss_mb"] = peak_rss_mb()
    values["cpu_seconds"] = cpu_seconds()
    print(json.dumps(values))


def child_run_on(
    slide: str, out: str, model: str, tile_px: int, overlap_px: int, device: str, precision: str
) -> None:
    """(a) on a chosen device and precision: ``bench_run.child_run`` with both passed on."""
    from wsi_deepr.allocator import tune_malloc
    from wsi_deepr.run import refocus_slide

    tune_malloc()  # as the `wsi-deepr` command does
    report = refocus_slide(slide, out, model=model, tile_px=tile_px, overlap_px=overlap_px,
                           overwrite=True, device=device, precision=precision)  # fmt: skip
    values = report.to_dict()
    values["peak_rss_mb"] = peak_rss_mb()
    values["cpu_seconds"] = cpu_seconds()
    print(json.dumps(values))


def child_pure_on(
    model: str, n_tiles: int, tile_px: int, batch_size: int, device: str, precision: str
) -> None:
    """(b) on a chosen device and precision: ``bench_run.child_pure`` with the run's
    predictor settings (precision, batch and tile, so TensorRT gets the run's profile)."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_deepr.gpu_session import model_precision, resolve_precision
    from wsi_deepr.inference import Predictor, plan_threads, select_provider
    from wsi_deepr.model_registry import card_from_onnx

    card = card_from_onnx(Path(model))
    workers, threads = plan_threads()
    provider = select_provider(device)
    wanted = model_precision(model, resolve_precision(precision, provider))
    predictor = Predictor(model, provider, threads, card.input_name, card.output_name,
                          card.in_channels, card.size_multiple, precision=wanted,
                          batch_size=batch_size, tile_px=tile_px)  # fmt: skip
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, tile_px, tile_px))
    batch = batch.astype(np.float32)
    predictor(batch)  # session creation, engine build and warm-up are not model time
    n_batches = math.ceil(n_tiles / batch_size)
    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: predictor(batch), range(n_batches)))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "cpu_seconds": time.process_time() - cpu_started,
                      "tiles": n_batches * batch_size, "workers": workers,
                      "ort_threads": threads, "provider": provider,
                      "precision": wanted}))  # fmt: skip


def child_sgemm(size: int, repeats: int) -> None:
    """Best-of-``repeats`` float32 matmul rate (threads from the environment)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    print(json.dumps({"gflop_per_s": 2.0 * size**3 / best / 1e9, "size": size}))


def _run_as_child(kind: str, rest: list[str]) -> None:
    if kind == "naive":
        child_naive(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
    elif kind == "monai":
        child_monai(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]))
    elif kind == "defaults":
        child_defaults(rest[0], rest[1], *rest[2:])
    elif kind == "run_on":
        child_run_on(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), rest[5], rest[6])
    elif kind == "pure_on":
        child_pure_on(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4], rest[5])
    elif kind == "sgemm":
        child_sgemm(int(rest[0]), int(rest[1]))
    elif kind == "run":  # bench_run's children, reached through this script
        child_run(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
    elif kind == "pure":
        child_pure(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    else:
        raise SystemExit(f"unknown child {kind}")


def _child(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return run_child("--child", *args, script=__file__, env=env)


# ----------------------------------------------------------------------------- parent
def _rates(row: dict[str, Any]) -> dict[str, Any]:
    """Add s_per_mm2 and tiles_per_s to a child's result."""
    row["s_per_mm2"] = row["seconds"] / row["area_mm2"]
    row["tiles_per_s"] = row["tiles_run"] / row["seconds"]
    return row


def measure(args: argparse.Namespace, workdir: Path, model: Path) -> dict[str, Any]:
    """Run the contenders; returns every row, the ratios and the GFLOP/s figures."""
    from wsi_deepr.model_cost import count_macs

    only = set(args.only)
    tile, overlap = str(args.tile_px), str(args.overlap_px)
    on = (args.device, args.precision)
    tuned = on != ("auto", "auto")
    cost = count_macs(model, height_px=args.tile_px, width_px=args.tile_px)
    rows: list[dict[str, Any]] = []
    run_first: dict[str, Any] | None = None
    for index, size in enumerate(args.sizes):
        slide = str(make_slide(workdir / f"slide_{size}.tif", size))
        common = {"size_px": size}
        if "a" in only:
            a_out = str(workdir / f"a_{size}.zarr")
            row = (_child("run_on", slide, a_out, str(model), tile, overlap, *on) if tuned
                   else _child("run", slide, a_out, str(model), tile, overlap))  # fmt: skip
            rows.append({"contender": "a", **common, **row})
            run_first = run_first or row
            print(_line(rows[-1]), flush=True)
        if "b" in only and index == 0 and run_first is not None:
            n = min(run_first["tiles_run"], args.max_pure_tiles)
            batch = str(run_first["extra"]["batch_size"])
            pure = (_child("pure_on", str(model), str(n), tile, batch, *on) if tuned
                    else _child("pure", str(model), str(n), tile, batch))  # fmt: skip
            scale = run_first["tiles_run"] / pure["tiles"]
            seconds = pure["seconds"] * scale
            rows.append(_rates({"contender": "b", **common, **pure, "seconds": seconds,
                                "cpu_seconds": pure["cpu_seconds"] * scale,
                                "tiles_run": run_first["tiles_run"], "tiles_timed": pure["tiles"],
                                "area_mm2": run_first["area_mm2"]}))  # fmt: skip
            print(_line(rows[-1]), flush=True)
        if "c" in only and index == 0:
            row = _child("naive", slide, str(workdir / f"c_{size}.tif"), str(model), tile, overlap)
            rows.append(_rates({"contender": "c", **common, **row}))
            print(_line(rows[-1]), flush=True)
        if "d" in only:
            batch = str(run_first["extra"]["batch_size"]) if run_first else "1"
            row = _child("monai", slide, str(workdir / f"d_{size}.tif"), str(model), tile,
                         overlap, batch)  # fmt: skip
            rows.append(_rates({"contender": "d", **common, **row}))
            print(_line(rows[-1]), flush=True)
        if "e" in only:
            row = _child("defaults", slide, str(workdir / f"e_{size}.zarr"), *on)
            rows.append({"contender": "e", **common, **row})
            print(_line(rows[-1]), flush=True)
        if args.variant:
            row = _child("run", slide, str(workdir / f"v_{size}.zarr"), str(args.variant),
                         str(args.variant_tile_px or args.tile_px), overlap)  # fmt: skip
            rows.append({"contender": "v", **common, **row})
            print(_line(rows[-1]), flush=True)

    threads = (run_first["workers"] * run_first["ort_threads"]) if run_first else os.cpu_count()
    env = {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS")}  # fmt: skip
    # numpy's sgemm is the CPU's yardstick; it says nothing of a GPU run
    on_cpu = args.device in ("auto", "cpu") and all(
        r.get("provider", "CPUExecutionProvider") == "CPUExecutionProvider" for r in rows
    )
    sgemm = _child("sgemm", str(args.sgemm_size), "3", env=env) if on_cpu else {}
    first = {r["contender"]: r for r in rows if r["size_px"] == args.sizes[0]}
    ratios = {}
    pairs = {"a/b": "ab", "c/a": "ca", "d/a": "da", "c/e": "ce", "c/v": "cv"}
    for name, (num, den) in pairs.items():
        if num in first and den in first:
            ratios[name] = first[num]["s_per_mm2"] / first[den]["s_per_mm2"]
    flop_per_tile = 2.0 * cost.macs
    achieved = {
        key: flop_per_tile * first[key]["tiles_run"] / first[key]["seconds"] / 1e9
        for key in ("a", "b")
        if key in first
    }
    return {
        "model": str(model),
        "variant": str(args.variant) if args.variant else None,
        "variant_tile_px": args.variant_tile_px or args.tile_px,
        "tile_px": args.tile_px,
        "overlap_px": args.overlap_px,
        "mpp": MPP,
        "macs_per_px": cost.macs_per_px,
        "gflop_per_tile": cost.gflop,
        "device": args.device,
        "precision": args.precision,
        "gpu": _gpu_name(),
        "sgemm_gflop_per_s": sgemm.get("gflop_per_s"),
        "sgemm_threads": threads,
        "model_gflop_per_s": achieved,
        "ratios_at_first_size": ratios,
        "rows": rows,
    }


NAMES = {
    "a": "a wsi-deepr run",
    "b": "b pure model",
    "c": "c naive loop",
    "d": "d MONAI sliding window",
    "e": "e wsi-deepr defaults",
    "v": "v wsi-deepr run, variant",
}


def _gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi``, or ``None`` without one."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _where(row: dict[str, Any]) -> str:
    """``  {CUDA fp16}``: the provider and precision of a row, where it says them."""
    provider = row.get("provider")
    precision = row.get("precision") or row.get("extra", {}).get("precision")
    if provider is None:
        return ""
    return f"  {{{provider.removesuffix('ExecutionProvider')} {precision or '?'}}}"


def _line(row: dict[str, Any]) -> str:
    rss = row.get("peak_rss_mb")
    return (
        f"{NAMES[row['contender']]:<24} {row['size_px']:>6} px  {row['area_mm2']:7.2f} mm2  "
        f"{row['tiles_run']:5d} tiles  {row['seconds']:8.1f} s  {row['s_per_mm2']:7.2f} s/mm2  "
        f"{row['tiles_per_s']:6.2f} tiles/s  peak RSS "
        + (f"{rss:7.0f} MB" if rss is not None else "      - ")
        + f"  (CPU {row['cpu_seconds'] / row['area_mm2']:.2f} s/mm2)"
        + (f"  [{row['model_name']}, {row['tile_px']} px tiles]" if "model_name" in row else "")
        + _where(row)
    )


def summary(result: dict[str, Any]) -> str:
    """The table, ratios and GFLOP/s as text."""
    lines = [_line(r) for r in result["rows"]]
    ratios = result["ratios_at_first_size"].items()
    text = ", ".join(f"({k[0]})/({k[2]}) = {v:.3f}" for k, v in ratios)
    lines.append(f"ratios of s/mm2 at the first size: {text}")
    sgemm = result["sgemm_gflop_per_s"]
    if result.get("gpu"):
        lines.append(f"GPU: {result['gpu']}; --device {result['device']}, "
                     f"--precision {result['precision']}")  # fmt: skip
    for key, value in result["model_gflop_per_s"].items():
        if sgemm is None:
            lines.append(f"model arithmetic in ({key}): {value:.1f} GFLOP/s; "
                         f"{result['macs_per_px'] / 1e3:.1f}k MAC/px")  # fmt: skip
            continue
        lines.append(
            f"model arithmetic in ({key}): {value:.1f} GFLOP/s = {100 * value / sgemm:.0f}% of "
            f"sgemm {sgemm:.1f} GFLOP/s ({result['sgemm_threads']} threads); "
            f"{result['macs_per_px'] / 1e3:.1f}k MAC/px, {result['gflop_per_tile']:.2f} "
            f"GFLOP per {result['tile_px']} px tile"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--model", default=None, help="ONNX model (default: bench_run's)")
    parser.add_argument("--tile-px", type=int, default=512)
    parser.add_argument("--overlap-px", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", default=CONTENDERS, help="contenders to run, e.g. abc")
    parser.add_argument(
        "--variant",
        type=Path,
        default=None,
        help="also run wsi-deepr with this model (v), e.g. an int8 variant",
    )
    parser.add_argument(
        "--variant-tile-px",
        type=int,
        default=None,
        help="tile of the variant's run (default --tile-px)",
    )
    parser.add_argument("--max-pure-tiles", type=int, default=400)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                        help="where (a), (b) and (e) run")  # fmt: skip
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16"], default="auto",
                        help="model precision of (a), (b) and (e)")  # fmt: skip
    parser.add_argument("--sgemm-size", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _run_as_child(args.child[0], args.child[1:])
        return
    args.only = [c for c in args.only if c in CONTENDERS]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsi-deepr-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model, model_text = Path(args.model), args.model
    else:
        model, model_text = default_model(workdir)
    print(f"model: {model_text}; tile {args.tile_px} px, overlap {args.overlap_px} px; "
          f"sizes {args.sizes}; workdir {workdir}", flush=True)  # fmt: skip
    result = measure(args, workdir, model)
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(summary(result).split("\n", len(result["rows"]))[-1])
    out = args.json or workdir / "compare.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
