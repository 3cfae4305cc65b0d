"""Benchmark ``wsi-deepr run`` end to end on large generated slides.

For each size: generate an RGB pyramidal tiled TIFF (0.325 um/px, JPEG tiles, tissue
everywhere so masking flatters nothing), run ``refocus_slide`` in a child process (so each
peak RSS is its own), and time the same number of tiles through the same sessions from
memory (the pure model time). Prints s/mm2, tiles/s, peak RSS and the ratio end-to-end /
pure model.

    python pipelines/bench_run.py                      # 8192 and 20000 px
    python pipelines/bench_run.py --sizes 8192 --model models/deepr-he.onnx

The default model is the shipped default brightfield model when one exists, otherwise a
representative residual-free conv U-Net (widths 16-32-64, ~24k MAC/px) built here with
``onnx.helper`` and random weights (its outputs are meaningless; its cost is not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MPP = 0.325


# ----------------------------------------------------------------------------- slide
def _tissue_tile(y0: int, x0: int, size_px: int, scale: int) -> np.ndarray:
    """Deterministic H&E-like texture for the tile at ``(y0, x0)`` of a level."""
    y = (np.arange(size_px)[:, None] + y0) * scale * 1.0
    x = (np.arange(size_px)[None, :] + x0) * scale * 1.0
    blobs = np.sin(y / 37.0) * np.cos(x / 29.0) + 0.5 * np.sin((x + y) / 11.0)
    nuclei = (np.sin(y / 7.3) * np.sin(x / 6.1) > 0.6).astype(np.float32)
    hash_noise = np.sin(y * 12.9898 + x * 78.233) * 43758.5453
    noise = (hash_noise - np.floor(hash_noise)) * 20.0
    r = 220 - 30 * blobs - 90 * nuclei + noise
    g = 150 - 40 * blobs - 80 * nuclei + noise
    b = 200 - 20 * blobs - 40 * nuclei + noise
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def make_slide(path: Path, size_px: int, *, tile_px: int = 512) -> Path:
    """Write a square pyramidal JPEG-tiled RGB TIFF of ``size_px`` without holding it."""
    import tifffile

    if path.is_file():
        return path
    resolution = (1e4 / MPP, 1e4 / MPP)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, size = 0, size_px
        while True:

            def tiles(size: int = size, level: int = level):
                for ty in range(0, size, tile_px):
                    for tx in range(0, size, tile_px):
                        yield _tissue_tile(ty, tx, tile_px, 2**level)

            tif.write(
                tiles(),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(tile_px, tile_px),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=1 if level else 0,
                resolution=(resolution[0] / 2**level, resolution[1] / 2**level),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            if size <= 1024:
                break
            level, size = level + 1, size // 2
    return path


# ----------------------------------------------------------------------------- model
def build_unet(path: Path, *, widths: tuple[int, ...] = (16, 32, 64), seed: int = 0) -> float:
    """Write a conv U-Net ONNX model with random weights; returns its MAC per pixel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []
    macs = 0.0
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def conv(x: str, cin: int, cout: int, k: int, level: int, relu: bool = True) -> str:
        nonlocal macs
        w = name("w")
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((cout, cin, k, k)) * math.sqrt(2 / (cin * k * k))).astype(
                np.float32), w))  # fmt: skip
        b = name("b")
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        y = name("conv")
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k],
                                      pads=[pad] * 4))  # fmt: skip
        macs += cin * cout * k * k / 4**level
        if not relu:
            return y
        z = name("relu")
        nodes.append(helper.make_node("LeakyRelu", [y], [z], alpha=0.1))
        return z

    def up(x: str, cin: int, cout: int, level: int) -> str:
        nonlocal macs
        w = name("wt")
        weight = rng.standard_normal((cin, cout, 2, 2)) * math.sqrt(1 / cin)
        inits.append(numpy_helper.from_array(weight.astype(np.float32), w))
        y = name("up")
        nodes.append(helper.make_node("ConvTranspose", [x, w], [y], kernel_shape=[2, 2],
                                      strides=[2, 2]))  # fmt: skip
        macs += cin * cout / 4**level
        return y

    x, cin, skips = "input", 3, []
    for level, width in enumerate(widths):
        if level:
            pooled = name("pool")
            nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[2, 2],
                                          strides=[2, 2]))  # fmt: skip
            x = pooled
        x = conv(conv(x, cin, width, 3, level), width, width, 3, level)
        cin = width
        skips.append(x)
    for level in range(len(widths) - 2, -1, -1):
        width = widths[level]
        x = up(x, cin, width, level)
        cat = name("cat")
        nodes.append(helper.make_node("Concat", [skips[level], x], [cat], axis=1))
        x = conv(conv(cat, 2 * width, width, 3, level), width, width, 3, level)
        cin = width
    out = conv(x, cin, 3, 1, 0, relu=False)
    nodes.append(helper.make_node("Add", [out, "input"], ["output"]))
    dims = ["n", 3, "y", "x"]
    graph = helper.make_graph(
        nodes, "bench_unet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = {"name": "bench-unet", "modality": "brightfield", "in_channels": 3,
            "channels": ["R", "G", "B"], "size_multiple": 2 ** (len(widths) - 1)}  # fmt: skip
    for key, value in card.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return macs


def default_model(workdir: Path) -> tuple[Path, str]:
    from wsi_deepr.model_registry import shipped_cards

    for card, path in shipped_cards().values():
        if card.modality == "brightfield":
            return path, f"shipped {card.name}"
    path = workdir / "bench_unet.onnx"
    macs = build_unet(path)
    return path, f"generated conv U-Net, {macs / 1e3:.1f}k MAC/px"


# ----------------------------------------------------------------------------- children
def child_run(slide: str, out: str, model: str, tile_px: int, overlap_px: int) -> None:
    """Run wsi-deepr end to end; print the report and peak RSS as JSON."""
    from wsi_deepr.allocator import tune_malloc
    from wsi_deepr.run import refocus_slide

    tune_malloc()  # as the `wsi-deepr` command does
    report = refocus_slide(slide, out, model=model, tile_px=tile_px, overlap_px=overlap_px,
                           overwrite=True, device="auto")  # fmt: skip
    values = report.to_dict()
    values["peak_rss_mb"] = peak_rss_mb()
    values["cpu_seconds"] = cpu_seconds()
    print(json.dumps(values))


def child_pure(model: str, n_tiles: int, tile_px: int, batch_size: int) -> None:
    """The same number of tiles through the same sessions from memory, same parallelism."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_deepr.inference import Predictor, plan_threads, select_provider
    from wsi_deepr.model_registry import card_from_onnx

    card = card_from_onnx(Path(model))
    workers, threads = plan_threads()
    predictor = Predictor(model, select_provider("auto"), threads, card.input_name,
                          card.output_name, card.in_channels, card.size_multiple)  # fmt: skip
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, tile_px, tile_px))
    batch = batch.astype(np.float32)
    predictor(batch[:1])  # session creation and warm-up are not model time
    n_batches = math.ceil(n_tiles / batch_size)
    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: predictor(batch), range(n_batches)))
    seconds = time.perf_counter() - started
    # CPU seconds of all threads: a measure of the work that other load on a shared
    # machine disturbs far less than the wall time
    cpu_seconds = time.process_time() - cpu_started
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                      "tiles": n_batches * batch_size, "workers": workers,
                      "ort_threads": threads}))  # fmt: skip


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads.

    On a shared machine this shows the work far better than the wall time (but spinning
    ONNX Runtime thread pools count as work).
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(
    *args: str, script: str = __file__, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script *args`` in a fresh process (its own peak RSS); its last stdout line
    is JSON, returned as a dict. ``env`` adds environment variables."""
    environ = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=environ)  # fmt: skip
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child {args[:2]} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 20000])
    parser.add_argument("--model", default=None, help="ONNX model (default: see above)")
    parser.add_argument("--tile-px", type=int, default=512)
    parser.add_argument("--overlap-px", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-pure", action="store_true", help="skip the pure model time")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "run":
            child_run(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
        else:
            child_pure(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsi-deepr-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model, model_text = Path(args.model), args.model
    else:
        model, model_text = default_model(workdir)
    print(f"model: {model_text}; tile {args.tile_px} px, overlap {args.overlap_px} px; "
          f"workdir {workdir}")  # fmt: skip
    rows = []
    for size in args.sizes:
        started = time.perf_counter()
        slide = make_slide(workdir / f"slide_{size}.tif", size)
        made_s = time.perf_counter() - started
        run = run_child("--child", "run", str(slide), str(workdir / f"out_{size}.zarr"), str(model),
                     str(args.tile_px), str(args.overlap_px))  # fmt: skip
        row = {"size_px": size, "slide_s": made_s, **run}
        if not args.no_pure:
            # at most 400 tiles: the per-tile model time does not depend on slide size
            pure = run_child("--child", "pure", str(model), str(min(run["tiles_run"], 400)),
                          str(args.tile_px), str(run["extra"]["batch_size"]))  # fmt: skip
            row["pure_model_s"] = pure["seconds"] * run["tiles_run"] / pure["tiles"]
        rows.append(row)
        print(_line(row), flush=True)
    print(json.dumps(rows, indent=1), file=sys.stderr)


def _line(row: dict[str, Any]) -> str:
    text = (
        f"{row['size_px']:>6} px  {row['area_mm2']:7.2f} mm2  tiles {row['tiles_run']:5d}  "
        f"end-to-end {row['seconds']:8.1f} s = {row['s_per_mm2']:6.2f} s/mm2, "
        f"{row['tiles_per_s']:5.2f} tiles/s (level 0 {row['model_seconds']:.1f} s, pyramid "
        f"{row['pyramid_seconds']:.1f} s)  peak RSS {row['peak_rss_mb']:7.0f} MB  "
        f"[{row['provider']}, {row['workers']}x{row['ort_threads']} threads]"
    )
    if "pure_model_s" in row:
        pure = row["pure_model_s"]
        text += (f"  pure model {pure:.1f} s = {pure / row['area_mm2']:.2f} s/mm2, "
                 f"end-to-end / pure = {row['seconds'] / pure:.3f}")  # fmt: skip
    return text


if __name__ == "__main__":
    main()
