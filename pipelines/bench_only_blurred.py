"""Benchmark ``wsi-deepr run --only-blurred`` against a full run on a partly blurred slide.

The slide is real tissue: CMU-1-Small-Region (Aperio H&E, 0.499 um/px) mirrored into an
N x N mosaic (``--mosaic``, 2 by default), with a disc holding about ``--fraction`` of
the tissue put ``--z`` um out of focus by :func:`wsi_deepr.physics.defocus_image`
(pixels outside it keep the scanned values). It is written as a tiled, uncompressed
pyramidal TIFF with its pixel size. Both runs go through the command line in child
processes (same model, device and options); the wall time of each is measured around the
process and read from its ``report.json``.

Prints: tiles run, seconds (wall, model), the speed-up, SSIM to the ground truth over the
disc's bounding box for the input and both outputs, and whether the pixels outside every
refocused tile are the input's, bit for bit.

    python pipelines/bench_only_blurred.py                        # z = 4 um, 20% of tissue
    python pipelines/bench_only_blurred.py --z 6 --fraction 0.2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CMU1 = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
NA = 0.75


def build(folder: Path, *, z_um: float, fraction: float, mosaic: int = 2) -> dict:
    """Write the slide; return paths, the disc and the ground truth."""
    import tifffile

    from wsi_deepr import physics
    from wsi_deepr.readers import open_slide
    from wsi_deepr.tissue import tissue_mask

    source = open_slide(CMU1)
    scan = np.asarray(source.data.compute())
    # an n x n mosaic of the scan, mirrored at every seam so no edge shows
    row = np.concatenate([scan if k % 2 == 0 else scan[:, :, ::-1] for k in range(mosaic)], 2)
    truth = np.ascontiguousarray(
        np.concatenate([row if k % 2 == 0 else row[:, ::-1] for k in range(mosaic)], axis=1)
    )
    mpp = source.mpp
    truth_path = folder / "truth.tif"
    _write_tiff(truth_path, truth, mpp, tifffile)
    mask = tissue_mask(open_slide(truth_path))
    down = truth.shape[1] / mask.shape[0]
    tissue_px = mask.sum() * down**2
    # a disc centred on the tissue's centre of mass, grown until it holds `fraction`
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() * down, xs.mean() * down
    yy, xx = np.mgrid[: truth.shape[1], : truth.shape[2]]
    distance = np.hypot(yy - cy, xx - cx)
    rows = np.minimum((np.arange(truth.shape[1]) / down).astype(int), mask.shape[0] - 1)
    cols = np.minimum((np.arange(truth.shape[2]) / down).astype(int), mask.shape[1] - 1)
    full_mask = mask[np.ix_(rows, cols)]
    radius = 50.0
    while (full_mask & (distance <= radius)).sum() < fraction * tissue_px:
        radius += 10.0
    disc = distance <= radius
    scan_f = truth.astype(np.float32) / 255.0
    depth = np.where(disc, z_um, 0.0)
    blurred = physics.defocus_image(
        scan_f, depth, optics=physics.brightfield_optics(NA, mpp), z_step_um=z_um
    )
    slide = np.where(disc, np.clip(np.rint(blurred * 255.0), 0, 255), truth).astype(np.uint8)
    path = folder / "partly_blurred.tif"
    _write_tiff(path, slide, mpp, tifffile)
    share = float((full_mask & disc).sum() / tissue_px)
    return {"path": path, "truth": truth, "input": slide, "disc": disc & full_mask, "share": share,
            "radius_px": radius, "centre": (cy, cx)}  # fmt: skip


def _write_tiff(path: Path, image: np.ndarray, mpp: float, tifffile) -> None:
    """Tiled RGB TIFF with 2x reduced levels as pages (as scanners write; OpenSlide reads
    them), so the tissue mask reads a small level rather than all of level 0."""
    levels = [image]
    while max(levels[-1].shape[1:]) > 1024:
        top = levels[-1]
        h, w = top.shape[1] // 2 * 2, top.shape[2] // 2 * 2
        down = top[:, :h, :w].reshape(3, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        levels.append(np.rint(down).astype(np.uint8))
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            px_per_cm = 1e4 / (mpp * 2**k)
            tif.write(
                np.moveaxis(level, 0, -1),
                tile=(256, 256),
                photometric="rgb",
                subfiletype=1 if k else 0,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                metadata=None,
            )


def run(slide: Path, out: Path, extra: list[str], device: str) -> tuple[float, dict]:
    command = [sys.executable, "-m", "wsi_deepr", "run", str(slide), str(out), "--model",
               "deepr-he-20x", "--device", device, "--overwrite", "-q", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    return wall, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--z", type=float, default=4.0, help="defocus of the disc (um)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the tissue")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mosaic", type=int, default=2,
                        help="the slide is an N x N mosaic of CMU-1-Small-Region")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=None, help="keep the files here")
    args = parser.parse_args()
    if not CMU1.is_file():
        sys.exit(f"needs {CMU1}")

    import zarr

    from wsi_deepr.metrics import ssim

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        made = build(folder, z_um=args.z, fraction=args.fraction, mosaic=args.mosaic)
        h, w = made["input"].shape[1:]
        print(f"slide {w} x {h} px (real CMU-1 tissue, 0.499 um/px), disc of "
              f"{made['radius_px']:.0f} px radius at z = {args.z} um holding "
              f"{100 * made['share']:.1f}% of the tissue")  # fmt: skip
        full_s, full = run(made["path"], folder / "full.zarr", [], args.device)
        only_s, only = run(made["path"], folder / "only.zarr", ["--only-blurred"], args.device)

        cy, cx = made["centre"]
        r = int(made["radius_px"])
        box = (slice(None), slice(max(0, int(cy) - r), int(cy) + r),
               slice(max(0, int(cx) - r), int(cx) + r))  # fmt: skip
        truth = made["truth"][box].astype(np.float32)

        def quality(image: np.ndarray) -> float:
            return ssim(image[box].astype(np.float32), truth, data_range=255.0)

        out_full = np.asarray(zarr.open_group(str(folder / "full.zarr"), mode="r")["s0"])
        out_only = np.asarray(zarr.open_group(str(folder / "only.zarr"), mode="r")["s0"])
        ssim_in, ssim_full, ssim_only = quality(made["input"]), quality(out_full), quality(out_only)
        ran = _ran_mask(only, (h, w))
        unchanged = bool(np.array_equal(out_only[:, ~ran], made["input"][:, ~ran]))
        covered = float(ran[made["disc"]].mean())  # the disc's tissue

    qc = only["extra"]["focus_qc"]
    print(
        f"full run:      {full['tiles_run']:4d} tiles, {full_s:6.1f} s wall "
        f"({full['seconds']:.1f} s in report, model+write {full['model_seconds']:.1f} s)"
    )
    print(
        f"--only-blurred:{only['tiles_run']:4d} tiles, {only_s:6.1f} s wall "
        f"({only['seconds']:.1f} s in report, model+write {only['model_seconds']:.1f} s, "
        f"focus map {qc['seconds']:.1f} s, maps+png {qc['output_qc_seconds']:.1f} s)"
    )
    print(
        f"speed-up: {full_s / only_s:.2f}x wall, {full['seconds'] / only['seconds']:.2f}x "
        f"by the reports"
    )
    print(
        f"SSIM to ground truth on the disc's box: input {ssim_in:.4f}, full {ssim_full:.4f}, "
        f"only-blurred {ssim_only:.4f} (difference {ssim_only - ssim_full:+.4f})"
    )
    print(
        f"tissue pixels of the disc inside refocused tiles: {100 * covered:.1f}%; pixels outside "
        f"every refocused tile ({100 * (~ran).mean():.1f}% of the slide) equal to the input bit "
        f"for bit: {unchanged}"
    )
    print(f"focus map: {100 * qc['focus']['blurred_fraction']:.1f}% of judged tissue blurred")


def _ran_mask(report: dict, shape_yx: tuple[int, int]) -> np.ndarray:
    """Pixels inside a refocused tile, from the maps written into the store."""
    from wsi_deepr.focus import focus_map, tiles_needing_model
    from wsi_deepr.readers import open_slide
    from wsi_deepr.spectra import scan_slide
    from wsi_deepr.tiling import TileGrid, plan_tiles
    from wsi_deepr.tissue import tissue_mask

    slide = open_slide(report["input_path"])
    mask = tissue_mask(slide)
    grid = TileGrid(report["tile_px"], report["overlap_px"])
    plan = plan_tiles(slide.shape_yx, grid, mask=mask, mask_downsample=slide.thumbnail_downsample)
    fmap = focus_map(scan_slide(slide, mask, coarse_spectra=False))
    selected = plan.tissue & tiles_needing_model(
        fmap, plan, blur_stops=report["extra"]["focus_qc"]["focus"]["blur_stops"]
    )
    if int(selected.sum()) != report["tiles_run"]:
        raise SystemExit("the plan recomputed here differs from the run's")
    ran = np.zeros(shape_yx, dtype=bool)
    tile_h, tile_w = plan.tile_hw
    for i, j in zip(*np.nonzero(selected), strict=True):
        y, x = int(plan.origins_y[i]), int(plan.origins_x[j])
        ran[y : y + tile_h, x : x + tile_w] = True
    return ran


if __name__ == "__main__":
    main()
