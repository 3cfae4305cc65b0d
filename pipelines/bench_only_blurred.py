"""Benchmark ``wsi-deepr run --only-blurred`` against a full run on a partly blurred slide.

The slide is real tissue: CMU-1-Small-Region (Aperio H&E, 0.499 um/px) mirrored into an
N x N mosaic (``--mosaic``, 2 by default), with a disc holding about ``--fraction`` of
the tissue put ``--z`` um out of focus by :func:`wsi_deepr.physics.defocus_image`
(brightfield under Köhler illumination, condenser at 2/3 of NA 0.75)
(pixels outside it keep the scanned values). It is written as a tiled, uncompressed
pyramidal TIFF with its pixel size. Both runs go through the command line in child
processes (same model, device and options: by default the model ``wsi-deepr run``
picks, else ``--model``); the wall and CPU time of each is measured around the process
and read from its ``report.json``.

Prints: the build's seconds and memory; tiles run, seconds (wall, CPU of the child,
model) and the speed-up; SSIM to the ground truth for the input and both outputs, over
the disc's bounding box and as the mean of the SSIM map over the disc's tissue; and
whether the pixels outside every model input (a tile, or its crop) are the input's, bit
for bit.

    python pipelines/bench_only_blurred.py                        # z = 4 um, 20% of tissue
    python pipelines/bench_only_blurred.py --z 6 --fraction 0.2 --device cuda
    python pipelines/bench_only_blurred.py --mosaic 3 --repeat 3   # the median of 3 pairs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
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
    """Write the slide; return its path, the disc (in its bounding box) and the truth.

    Only the disc's bounding box is blurred (:func:`defocus_inside`), and the disc's
    radius comes from the tissue on the thumbnail grid: no full-slide float temporaries,
    so a 9 x 12 mm mosaic builds in about a minute.
    """
    import tifffile

    from wsi_deepr.readers import open_slide
    from wsi_deepr.tissue import tissue_mask

    source = open_slide(CMU1)
    scan = np.asarray(source.data.compute())
    # an n x n mosaic of the scan, mirrored at every seam so no edge shows
    row = np.concatenate([scan if k % 2 == 0 else scan[:, :, ::-1] for k in range(mosaic)], 2)
    truth = np.ascontiguousarray(
        np.concatenate([row if k % 2 == 0 else row[:, ::-1] for k in range(mosaic)], axis=1)
    )
    del row
    mpp = source.mpp
    height_px, width_px = truth.shape[1:]
    truth_path = folder / "truth.tif"
    _write_tiff(truth_path, truth, mpp, tifffile)
    mask = tissue_mask(open_slide(truth_path))
    down = height_px / mask.shape[0]
    tissue_px = mask.sum() * down**2
    # a disc centred on the tissue's centre of mass holding `fraction` of it: the
    # quantile of the distances of the tissue's thumbnail pixels (each down^2 pixels)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() * down, xs.mean() * down
    distance_px = np.sort(np.hypot((ys + 0.5) * down - cy, (xs + 0.5) * down - cx))
    radius_px = float(distance_px[min(distance_px.size - 1, int(np.ceil(fraction * ys.size)) - 1)])
    y0, y1 = max(0, int(cy - radius_px)), min(height_px, int(np.ceil(cy + radius_px)) + 1)
    x0, x1 = max(0, int(cx - radius_px)), min(width_px, int(np.ceil(cx + radius_px)) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius_px**2  # on the box
    rows = np.minimum((np.arange(y0, y1) / down).astype(int), mask.shape[0] - 1)
    cols = np.minimum((np.arange(x0, x1) / down).astype(int), mask.shape[1] - 1)
    tissue_box = mask[np.ix_(rows, cols)]
    truth_box = truth[:, y0:y1, x0:x1].copy()
    slide = truth  # blurred in place: one full-size slide in memory
    del truth
    defocus_inside(slide, (y0, x0), disc, z_um=z_um, mpp=mpp)
    path = folder / "partly_blurred.tif"
    _write_tiff(path, slide, mpp, tifffile)
    share = float((tissue_box & disc).sum() / tissue_px)
    return {"path": path, "truth_box": truth_box, "input": slide,
            "box": (y0, y1, x0, x1), "disc": disc & tissue_box, "share": share,
            "radius_px": radius_px, "centre": (cy, cx)}  # fmt: skip


def defocus_inside(
    image_u8: np.ndarray,
    origin_yx: tuple[int, int],
    inside: np.ndarray,
    *,
    z_um: float,
    mpp: float,
    block_px: int = 2048,
) -> None:
    """Put the pixels of ``inside`` (a mask on the box at ``origin_yx``) ``z_um`` out of
    focus, in place; the others keep their values.

    The box is blurred in blocks of ``block_px``, each with a halo of two PSF
    half-widths (mirrored only at the image's edges), from a copy of the box and its
    halo taken first, so every pixel sees its whole in-focus PSF neighbourhood: the same
    as blurring the whole image with :func:`wsi_deepr.physics.defocus_image` (a defocus
    map of ``z_um`` inside, 0 outside) up to the FFTs' float rounding, with temporaries
    of the box (uint8) and one block (float).
    """
    from wsi_deepr import physics

    # brightfield under Köhler illumination, as the evaluation and the QC estimate image it
    optics = physics.scanner_optics(NA, mpp)
    halo_px = 2 * max(physics.psf(o, z_um).shape[0] // 2 for o in optics)
    height_px, width_px = image_u8.shape[1:]
    y0, x0 = origin_yx
    sy0, sy1 = max(0, y0 - halo_px), min(height_px, y0 + inside.shape[0] + halo_px)
    sx0, sx1 = max(0, x0 - halo_px), min(width_px, x0 + inside.shape[1] + halo_px)
    source = image_u8[:, sy0:sy1, sx0:sx1].copy()
    for by0 in range(y0, y0 + inside.shape[0], block_px):
        for bx0 in range(x0, x0 + inside.shape[1], block_px):
            by1 = min(by0 + block_px, y0 + inside.shape[0])
            bx1 = min(bx0 + block_px, x0 + inside.shape[1])
            keep = inside[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0]
            if not keep.any():
                continue
            ry0, ry1 = max(0, by0 - halo_px), min(height_px, by1 + halo_px)
            rx0, rx1 = max(0, bx0 - halo_px), min(width_px, bx1 + halo_px)
            crop = source[:, ry0 - sy0 : ry1 - sy0, rx0 - sx0 : rx1 - sx0]
            crop = crop.astype(np.float32) / np.float32(255.0)
            blurred = physics.defocus_image(crop, z_um, optics=optics)
            blurred = blurred[:, by0 - ry0 : by1 - ry0, bx0 - rx0 : bx1 - rx0]
            target = image_u8[:, by0:by1, bx0:bx1]
            target[:, keep] = np.clip(np.rint(blurred[:, keep] * 255.0), 0, 255).astype(np.uint8)


def _write_tiff(path: Path, image: np.ndarray, mpp: float, tifffile) -> None:
    """Tiled RGB TIFF with 2x reduced levels as pages (as scanners write; OpenSlide reads
    them), so the tissue mask reads a small level rather than all of level 0."""
    levels = [image]
    while max(levels[-1].shape[1:]) > 1024:
        top = levels[-1]
        h, w = top.shape[1] // 2 * 2, top.shape[2] // 2 * 2
        down = np.empty((3, h // 2, w // 2), dtype=np.uint8)
        for y in range(0, h, 1024):  # strips: small temporaries
            # sums of 2 x 2 in uint16, divided in float32: the same values as rounding
            # the mean in float64
            pairs = top[:, y : min(y + 1024, h) : 2].astype(np.uint16)
            pairs += top[:, y + 1 : min(y + 1024, h) : 2]
            total = pairs[:, :, 0:w:2] + pairs[:, :, 1:w:2]
            down[:, y // 2 : y // 2 + total.shape[1]] = np.rint(total / np.float32(4.0))
        levels.append(down)
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


def run(slide: Path, out: Path, extra: list[str], device: str, model: str | None) -> dict:
    """One ``wsi-deepr run`` in a child process: its report, wall and CPU seconds."""
    command = [sys.executable, "-m", "wsi_deepr", "run", str(slide), str(out),
               "--device", device, "--overwrite", "-q", *extra]  # fmt: skip
    if model is not None:
        command += ["--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall_s, "cpu_s": cpu_s, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--z", type=float, default=4.0, help="defocus of the disc (um)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the tissue")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None,
                        help="for --model (default: the model `wsi-deepr run` picks)")  # fmt: skip
    parser.add_argument("--mosaic", type=int, default=2,
                        help="the slide is an N x N mosaic of CMU-1-Small-Region")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=None, help="keep the files here")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate N full and selective runs (the median pair)")  # fmt: skip
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not CMU1.is_file():
        sys.exit(f"needs {CMU1}")

    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        made = build(folder, z_um=args.z, fraction=args.fraction, mosaic=args.mosaic)
        after = resource.getrusage(resource.RUSAGE_SELF)
        build_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        build_wall_s = time.perf_counter() - started
        h, w = made["input"].shape[1:]
        print(f"slide {w} x {h} px (real CMU-1 tissue, 0.499 um/px), disc of "
              f"{made['radius_px']:.0f} px radius at z = {args.z} um holding "
              f"{100 * made['share']:.1f}% of the tissue; built in {build_wall_s:.1f} s wall, "
              f"{build_cpu_s:.1f} CPU s, peak RSS "
              f"{after.ru_maxrss / 2**20:.1f} GiB")  # fmt: skip
        # Full and selective runs alternate, so a slow spell of a shared machine hits both;
        # every pair's ratio is printed and the pair with the median ratio in full.
        fulls, onlys = [], []
        for _ in range(args.repeat):
            fulls.append(run(made["path"], folder / "full.zarr", [], args.device, args.model))
            onlys.append(run(made["path"], folder / "only.zarr", ["--only-blurred"],
                             args.device, args.model))  # fmt: skip
        # the pair with the median ratio (the lower of the two middle ones for an even count)
        order = sorted(range(len(fulls)), key=lambda k: fulls[k]["wall_s"] / onlys[k]["wall_s"])
        full, only = fulls[order[(len(order) - 1) // 2]], onlys[order[(len(order) - 1) // 2]]

        y0, y1, x0, x1 = made["box"]
        truth = made["truth_box"]
        # SSIM in even row strips of at most about 8 Mpx (their mean, weighted by rows):
        # SSIM of the whole box takes ~100 bytes a pixel
        n_strips = -(-truth.shape[1] * truth.shape[2] // 2**23)
        edges = np.linspace(0, truth.shape[1], n_strips + 1).astype(int)

        def quality(box: np.ndarray) -> tuple[float, float]:
            """SSIM over the box, and the mean of its SSIM map over the disc's tissue."""
            total, on_disc, n_disc = 0.0, 0.0, 0
            for r0, r1 in itertools.pairwise(edges):
                value, local = ssim_map(box[:, r0:r1].astype(np.float32),
                                        truth[:, r0:r1].astype(np.float32))  # fmt: skip
                total += value * (r1 - r0)
                where = made["disc"][r0:r1]
                on_disc += float(local[where].sum())
                n_disc += int(where.sum())
            return total / box.shape[1], on_disc / max(n_disc, 1)

        level0_full = zarr.open_group(str(folder / "full.zarr"), mode="r")["s0"]
        level0_only = zarr.open_group(str(folder / "only.zarr"), mode="r")["s0"]
        ssim_in = quality(made["input"][:, y0:y1, x0:x1])
        ssim_full = quality(np.asarray(level0_full[:, y0:y1, x0:x1]))
        ssim_only = quality(np.asarray(level0_only[:, y0:y1, x0:x1]))
        ran = _ran_mask(only["report"], (h, w))
        unchanged = True
        strip_px = 2048  # compared in strips: no full-slide copies
        for s0 in range(0, h, strip_px):
            keep = ~ran[s0 : s0 + strip_px]
            out_strip = np.asarray(level0_only[:, s0 : s0 + strip_px])
            unchanged &= bool(
                np.array_equal(out_strip[:, keep], made["input"][:, s0 : s0 + strip_px][:, keep])
            )
        covered = float(ran[y0:y1, x0:x1][made["disc"]].mean())  # the disc's tissue

    for name, result in (("full run:      ", full), ("--only-blurred:", only)):
        report = result["report"]
        line = (f"{name}{report['tiles_run']:4d} tiles, {result['wall_s']:6.1f} s wall, "
                f"{result['cpu_s']:6.1f} CPU s ({report['seconds']:.1f} s in report, "
                f"model+write {report['model_seconds']:.1f} s")  # fmt: skip
        if result is only:
            qc = report["extra"]["focus_qc"]
            line += (f", focus map {qc['seconds']:.1f} s, maps+png "
                     f"{qc['output_qc_seconds']:.1f} s")  # fmt: skip
        print(line + ")")
    print(f"model: {full['report']['model_name']}, {full['report']['provider']}")
    if len(fulls) > 1:
        pairs = [f["wall_s"] / o["wall_s"] for f, o in zip(fulls, onlys, strict=True)]
        walls_full = " ".join(f"{r['wall_s']:.1f}" for r in fulls)
        walls_only = " ".join(f"{r['wall_s']:.1f}" for r in onlys)
        print(f"{len(fulls)} alternating pairs, wall s: full {walls_full}; --only-blurred "
              f"{walls_only}; ratio per pair "
              f"{' '.join(f'{v:.2f}' for v in pairs)}; the lines above and below are the "
              "pair with the median ratio")  # fmt: skip
    print(
        f"speed-up: {full['wall_s'] / only['wall_s']:.2f}x wall, "
        f"{full['cpu_s'] / only['cpu_s']:.2f}x CPU, "
        f"{full['report']['seconds'] / only['report']['seconds']:.2f}x by the reports"
    )
    for k, where in ((0, "the disc's box"), (1, "the disc's tissue (SSIM map)")):
        print(
            f"SSIM to ground truth on {where}: input {ssim_in[k]:.4f}, full {ssim_full[k]:.4f}, "
            f"only-blurred {ssim_only[k]:.4f} (difference {ssim_only[k] - ssim_full[k]:+.4f})"
        )
    print(
        f"tissue pixels of the disc inside the model's inputs (tiles or crops): "
        f"{100 * covered:.1f}%; pixels outside all of them ({100 * (~ran).mean():.1f}% of the "
        f"slide) equal to the input bit for bit: {unchanged}"
    )
    qc = only["report"]["extra"]["focus_qc"]
    print(f"focus map: {100 * qc['focus']['blurred_fraction']:.1f}% of judged tissue blurred")
    picked = qc["only_blurred"]
    print(f"model inputs: {picked['tiles_refocused']} tiles, {picked['tiles_cropped']} of them "
          f"cropped, {picked['model_mpx']:.1f} Mpx ({100 * picked['model_share_of_tiles']:.0f}% "
          f"of the tiles' pixels)")  # fmt: skip


def ssim_map(image: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    """SSIM (as :func:`wsi_deepr.metrics.ssim`: 8-bit range, Gaussian window of 1.5 px) and
    its map averaged over the channels."""
    from skimage.metrics import structural_similarity

    value, local = structural_similarity(
        image, truth, data_range=255.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )  # fmt: skip
    return float(value), local.mean(axis=0)


def _ran_mask(report: dict, shape_yx: tuple[int, int]) -> np.ndarray:
    """Pixels inside the model's input (a refocused tile, or its crop), recomputed."""
    from wsi_deepr.focus import focus_map, select_tiles
    from wsi_deepr.readers import open_slide
    from wsi_deepr.spectra import scan_slide
    from wsi_deepr.tiling import TileGrid, plan_tiles
    from wsi_deepr.tissue import tissue_mask

    slide = open_slide(report["input_path"])
    mask = tissue_mask(slide)
    grid = TileGrid(report["tile_px"], report["overlap_px"])
    plan = plan_tiles(slide.shape_yx, grid, mask=mask, mask_downsample=slide.thumbnail_downsample)
    fmap = focus_map(scan_slide(slide, mask, coarse_spectra=False))
    only = report["extra"]["focus_qc"]["only_blurred"]
    selected = select_tiles(fmap, plan, blur_stops=only["blur_stops"],
                            crop=report["provider"] == "CPUExecutionProvider")  # fmt: skip
    if selected.n_run != report["tiles_run"] or selected.model_px != round(only["model_mpx"] * 1e6):
        raise SystemExit("the plan recomputed here differs from the run's")
    ran = np.zeros(shape_yx, dtype=bool)
    for i, j in zip(*np.nonzero(selected.tissue), strict=True):
        cy0, cy1, cx0, cx1 = selected.crop_of(i, j)
        y, x = int(plan.origins_y[i]), int(plan.origins_x[j])
        ran[y + cy0 : y + cy1, x + cx0 : x + cx1] = True
    return ran


if __name__ == "__main__":
    main()
