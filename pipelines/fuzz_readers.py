"""Fuzz the slide readers with mutated small inputs and report what happened.

Every mutated input (TIFF, OME-TIFF, PNG, OME-Zarr 0.4/0.5; flipped bytes, extreme 32-bit
values, truncation, insertion, edited or broken JSON metadata) must either read correctly
or raise a one-line ``InputError`` naming the file. Anything else is a crash (a bug).

Usage: ``python pipelines/fuzz_readers.py --n 10000 --seed 0 [--out fuzz_report.json]``
Exit status 1 when any input crashed.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reader_fuzz import make_seeds, mutate_input, read_everything


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="mutated inputs to try")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=None, help="JSON report to write")
    args = parser.parse_args()
    logging.getLogger("wsi_deepr").setLevel(logging.ERROR)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    import warnings

    warnings.simplefilter("ignore")

    rng = np.random.default_rng(args.seed)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    crashes: dict[str, dict[str, str]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = make_seeds(Path(tmp) / "seeds")
        for i in range(args.n):
            seed = seeds[i % len(seeds)]
            case = mutate_input(seed, Path(tmp) / ("case" + "".join(seed.suffixes)), rng)
            outcome = read_everything(case)
            counts[(seed.name, outcome.kind)] += 1
            if outcome.kind == "crash":
                last = outcome.detail.strip().splitlines()[-1][:200]
                if last not in crashes:
                    crashes[last] = {"seed": seed.name, "case": str(i), "detail": outcome.detail}
                    keep = Path(tmp).parent / f"wsi_deepr_fuzz_crash_{i}{''.join(seed.suffixes)}"
                    print(f"crash #{len(crashes)} at input {i} ({seed.name}): {last}")
                    print(f"  kept as {keep}" if case.is_file() else "")
                    if case.is_file():
                        keep.write_bytes(case.read_bytes())
            if (i + 1) % 1000 == 0:
                print(f"{i + 1} inputs, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    summary = {
        "inputs": args.n,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "outcomes": {f"{s}:{k}": n for (s, k), n in sorted(counts.items())},
        "totals": dict(collections.Counter(k for (_, k) in counts.elements())),
        "distinct_crashes": len(crashes),
        "crashes": list(crashes.values()),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "crashes"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
