"""Mutated small slides for fuzzing the readers (used by a test and by a pipeline script).

A mutated input must either open and read correctly or raise an
:class:`~wsi_deepr.errors.InputError`; any other exception is a bug in wsi-deepr.
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from slides import make_ome_tiff, make_ome_zarr, make_png, make_tiff_slide, synthetic_tissue

from wsi_deepr.errors import InputError
from wsi_deepr.readers import open_slide

EXTREMES = (
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\x7f",
    b"\x01\x00\x00\x00",
    b"\x00\x00\x01\x00",
)
MAX_READ_ELEMENTS = 20_000_000
"""Do not compute more than this many pixels per input (a mutated size can be huge)."""


def make_seeds(folder: Path) -> list[Path]:
    """Small valid inputs of every reader family to mutate."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = synthetic_tissue((300, 400), seed=0)
    fluo = synthetic_tissue((200, 260), seed=1, rgb=False, n_channels=2, dtype=np.uint16)
    return [
        make_tiff_slide(folder / "tiled.tif", rgb, 0.5, tile=64, compression="zlib"),
        make_tiff_slide(folder / "subifd.tif", rgb, 0.5, tile=64, layout="subifds"),
        make_ome_tiff(folder / "fluo.ome.tif", fluo, 0.325, tile=64, compression="zlib"),
        make_png(folder / "fov.png", rgb[:, :100, :120]),
        make_ome_zarr(folder / "img.zarr", fluo, 0.5, version="0.5", chunk_px=64),
        make_ome_zarr(folder / "img04.zarr", rgb, 0.5, version="0.4", chunk_px=128),
    ]


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation: flipped bytes, extreme 32-bit values, truncation or insertion."""
    if not data:
        return bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    buf = bytearray(data)
    kind = int(rng.integers(0, 5))
    # Headers and IFDs sit near the start of small files: bias positions there.
    limit = len(buf) if rng.random() < 0.5 else min(len(buf), 1024)
    if kind == 0:
        for _ in range(int(rng.integers(1, 16))):
            buf[int(rng.integers(0, limit))] = int(rng.integers(0, 256))
    elif kind == 1:
        pos = int(rng.integers(0, max(1, limit - 4)))
        value = EXTREMES[int(rng.integers(0, len(EXTREMES)))]
        buf[pos : pos + 4] = value
    elif kind == 2:
        del buf[int(rng.integers(0, len(buf))) :]
    elif kind == 3:
        pos = int(rng.integers(0, limit))
        buf[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    else:
        pos = int(rng.integers(0, limit))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _mutate_json(text: str, rng: np.random.Generator) -> str:
    """Change one value in an OME-Zarr metadata document (or break its syntax)."""
    if rng.random() < 0.2:
        return mutate_bytes(text.encode(), rng).decode("latin-1")
    doc = json.loads(text)
    nodes: list[tuple[object, object]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                nodes.append((node, key))
                walk(value)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                nodes.append((node, index))
                walk(value)

    walk(doc)
    parent, key = nodes[int(rng.integers(0, len(nodes)))]
    choices: list[object] = [None, 0, -1, 1e300, float("nan"), "x", [], {}, [1, 2], "0.6", True]
    replacement = choices[int(rng.integers(0, len(choices)))]
    if rng.random() < 0.2:
        if isinstance(parent, dict):
            del parent[key]  # type: ignore[arg-type]
        elif isinstance(parent, list):
            del parent[key]  # type: ignore[call-overload]
    elif isinstance(parent, dict):
        parent[key] = replacement  # type: ignore[index]
    elif isinstance(parent, list):
        parent[key] = replacement  # type: ignore[call-overload]
    return json.dumps(doc)


def mutate_input(seed: Path, out: Path, rng: np.random.Generator) -> Path:
    """Write a mutated copy of ``seed`` (file or Zarr store) at ``out``."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if seed.is_dir():
        shutil.copytree(seed, out)
        files = sorted(p for p in out.rglob("*") if p.is_file())
        meta = [p for p in files if p.name in ("zarr.json", ".zattrs", ".zarray")]
        target = meta[int(rng.integers(0, len(meta)))] if rng.random() < 0.7 else None
        if target is None:
            target = files[int(rng.integers(0, len(files)))]
            target.write_bytes(mutate_bytes(target.read_bytes(), rng))
        else:
            text = target.read_text()
            try:
                target.write_text(_mutate_json(text, rng), encoding="latin-1")
            except ValueError:
                target.write_bytes(mutate_bytes(text.encode(), rng))
        return out
    out.write_bytes(mutate_bytes(seed.read_bytes(), rng))
    return out


@dataclass(frozen=True)
class Outcome:
    """What one input did."""

    kind: str
    """``"ok"`` (read fine), ``"input-error"`` (clear error) or ``"crash"`` (a bug)."""
    detail: str


def read_everything(path: Path) -> Outcome:
    """Open an input and read what a run would read; classify the result."""
    try:
        slide = open_slide(path, mpp=0.5)
        if slide.thumbnail.size <= MAX_READ_ELEMENTS:
            slide.thumbnail.compute(scheduler="sync")
        data = slide.data
        if data.size <= MAX_READ_ELEMENTS:
            data.compute(scheduler="sync")
        else:
            data.blocks[0, 0, 0].compute(scheduler="sync")
            data.blocks[0, -1, -1].compute(scheduler="sync")
    except InputError as exc:
        text = exc.one_line()
        if str(path) not in text or "\n" in text:
            return Outcome("crash", f"unclear message: {text!r}")
        return Outcome("input-error", text)
    except Exception as exc:
        return Outcome("crash", "".join(traceback.format_exception(exc))[-2000:])
    return Outcome("ok", "")
