"""Pure model speed of model variants and tile sizes, in tiles/s and s/mm2.

Each model (e.g. a full model and its int8 variants from ``wsi-deepr quantize``) and each
``TILE/OVERLAP`` runs ``--n-tiles`` tiles from memory through the same sessions and
parallelism as ``wsi-deepr run`` (``bench_run.child_pure``, a child process each). The
model's s/mm2 counts what a tile adds inside a large slide, ``(tile - overlap)^2`` pixels
at 0.325 um/px, so a larger tile with the same overlap does less overlap work per mm2.
CPU seconds per tile (all threads) are printed too: on a shared machine they show the
work far better than the wall time. GFLOP/s uses the MACs counted from the first model's
ONNX graph at that tile size (list the full model first: an int8 variant does the same
multiply-accumulates in int8).

    python pipelines/bench_variants.py models/deepr-he-20x.onnx he-int8.onnx \\
        --tiles 512/64 1024/64 --n-tiles 40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import MPP, run_child  # a sibling script, not a package


def measure(
    model: Path, tile_px: int, overlap_px: int, n_tiles: int, gflop_per_tile: float
) -> dict[str, Any]:
    """One model at one tile size: seconds per tile, tiles/s, s/mm2, GFLOP/s."""
    pure = run_child("--child", "pure", str(model), str(n_tiles), str(tile_px), "1")
    s_per_tile = pure["seconds"] / pure["tiles"]
    new_mm2 = (tile_px - overlap_px) ** 2 * MPP**2 / 1e6
    return {
        "model": str(model),
        "tile_px": tile_px,
        "overlap_px": overlap_px,
        "tiles": pure["tiles"],
        "tiles_per_s": 1.0 / s_per_tile,
        "s_per_mm2": s_per_tile / new_mm2,
        "gflop_per_s": gflop_per_tile / s_per_tile,
        "cpu_s_per_tile": pure["cpu_seconds"] / pure["tiles"],
        "cpu_s_per_mm2": pure["cpu_seconds"] / pure["tiles"] / new_mm2,
        "workers": pure["workers"],
        "ort_threads": pure["ort_threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--tiles", nargs="+", default=["512/64"], help="TILE/OVERLAP in px")
    parser.add_argument("--n-tiles", type=int, default=40, help="tiles timed per measurement")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from wsi_deepr.model_cost import count_macs

    rows = []
    for spec in args.tiles:
        tile_px, overlap_px = (int(v) for v in spec.split("/"))
        gflop = count_macs(args.models[0], height_px=tile_px, width_px=tile_px).gflop
        for model in args.models:
            row = measure(model, tile_px, overlap_px, args.n_tiles, gflop)
            rows.append(row)
            print(
                f"{model.name:<32} {tile_px:>5}/{overlap_px:<3} {row['tiles']:4d} tiles  "
                f"{row['tiles_per_s']:6.2f} tiles/s  {row['s_per_mm2']:6.2f} s/mm2 (model)  "
                f"{row['gflop_per_s']:6.1f} GFLOP/s  [{row['workers']}x{row['ort_threads']}]  "
                f"CPU {row['cpu_s_per_tile']:.3f} s/tile = {row['cpu_s_per_mm2']:.2f} s/mm2",
                flush=True,
            )
    base = rows[0]
    for row in rows[1:]:
        print(f"{Path(row['model']).name} {row['tile_px']}/{row['overlap_px']}: "
              f"{base['s_per_mm2'] / row['s_per_mm2']:.2f}x the speed per mm2 of "
              f"{Path(base['model']).name} {base['tile_px']}/{base['overlap_px']} "
              f"({base['cpu_s_per_mm2'] / row['cpu_s_per_mm2']:.2f}x in CPU time)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
