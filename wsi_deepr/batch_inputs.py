"""What a batch runs: slides from paths, globs or a CSV manifest, each with its output.

A manifest is a CSV file with a header row; columns ``slide`` (required), ``output``,
``mpp`` and ``model`` (optional, empty cells allowed). Relative slide paths are read from
the manifest's folder; relative outputs go into the batch's ``--out`` folder.

Examples
--------
>>> jobs = collect_jobs(["slides/*.svs", "extra.ome.tif"], "out")  # doctest: +SKIP
>>> jobs[0].output  # doctest: +SKIP
PosixPath('/abs/out/a.zarr')
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi_deepr.errors import ConfigError, InputError

MANIFEST_COLUMNS = ("slide", "output", "mpp", "model")
"""Columns a manifest may have; ``slide`` is required."""
_COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".ome.btf")
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True, slots=True)
class SlideJob:
    """One slide of a batch and where its output goes."""

    slide: str
    """The slide file or store (absolute path, or a URL)."""
    output: Path
    """The OME-Zarr store to write (absolute)."""
    mpp: float | None = None
    """Pixel size in micrometres overriding the file's."""
    model: str | None = None
    """Model name or ``.onnx`` path for this slide; the batch's model when ``None``."""


def output_name(slide: str | Path) -> str:
    """The output store name of a slide: its name without format suffixes, plus ``.zarr``.

    Parameters
    ----------
    slide : str or Path
        Slide file or store.

    Returns
    -------
    str
        E.g. ``"a.svs" -> "a.zarr"``, ``"b.ome.tif" -> "b.zarr"``.
    """
    name = Path(str(slide).rstrip("/")).name
    for suffix in _COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".zarr"
    return (Path(name).stem or name) + ".zarr"


def collect_jobs(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    model: str | None = None,
) -> list[SlideJob]:
    """Expand paths, globs and manifests into slide jobs with one output each.

    Parameters
    ----------
    inputs : sequence of str or Path
        Slide files or stores, glob patterns (``*``, ``?``, ``[``; ``**`` recursive) and
        CSV manifests (``.csv``), in any mix.
    out_dir : str or Path
        Folder of the outputs (``<slide name>.zarr`` unless a manifest names one).
    mpp, model : optional
        Defaults for slides a manifest gives none for.

    Returns
    -------
    list of SlideJob
        In input order, a slide given twice kept once.

    Raises
    ------
    InputError
        A path that does not exist, a folder that is not a Zarr store, a glob that
        matches nothing, no slides at all.
    ConfigError
        A manifest that cannot be read or has a bad row, or two slides with one output.
    """
    out = Path(out_dir).expanduser().absolute()
    jobs: list[SlideJob] = []
    for item in inputs:
        text = str(item)
        if text.lower().endswith(".csv") and not any(c in text for c in _GLOB_CHARS):
            jobs.extend(read_manifest(text, out, mpp=mpp, model=model))
        elif any(c in text for c in _GLOB_CHARS):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise InputError(text, "matches no file")
            jobs.extend(_job(m, out, mpp=mpp, model=model) for m in matches)
        else:
            jobs.append(_job(_check_slide(text, text), out, mpp=mpp, model=model))
    unique: dict[str, SlideJob] = {}
    for job in jobs:
        unique.setdefault(job.slide, job)
    jobs = list(unique.values())
    if not jobs:
        raise InputError(" ".join(map(str, inputs)) or "INPUT", "no slides to run")
    _check_unique_outputs(jobs)
    return jobs


def read_manifest(
    path: str | Path,
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    model: str | None = None,
) -> list[SlideJob]:
    """Read a CSV manifest (columns ``slide``, ``output``, ``mpp``, ``model``).

    Parameters
    ----------
    path : str or Path
        The CSV file.
    out_dir : str or Path
        Folder relative outputs (and the default outputs) are placed in.
    mpp, model : optional
        Values for rows whose cell is empty.

    Returns
    -------
    list of SlideJob

    Raises
    ------
    ConfigError
        Unreadable file, missing ``slide`` column, unknown columns, a slide that does not
        exist, an mpp that is not a positive number (the row is named as ``file:line``).
    """
    manifest = Path(path).expanduser().absolute()
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(manifest, f"cannot read the manifest: {exc.strerror or exc}") from exc
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "slide" not in columns:
        raise ConfigError(manifest, "a manifest needs a header row with a 'slide' column")
    unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
    if unknown:
        raise ConfigError(
            manifest,
            f"unknown column(s) {', '.join(unknown)}; allowed: {', '.join(MANIFEST_COLUMNS)}",
        )
    reader.fieldnames = columns
    out = Path(out_dir).expanduser().absolute()
    jobs = []
    for row in reader:
        where = f"{manifest}:{reader.line_num}"
        cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(cells.values()):
            continue
        if not cells.get("slide"):
            raise ConfigError(where, "the slide cell is empty")
        slide = cells["slide"]
        if not _is_url(slide) and not Path(slide).expanduser().is_absolute():
            slide = str(manifest.parent / slide)
        if not _is_url(slide) and not os.path.exists(os.path.expanduser(slide)):
            raise ConfigError(where, f"slide {slide} does not exist")
        output = out / cells["output"] if cells.get("output") else None
        jobs.append(
            _job(
                slide,
                out,
                output=output,
                mpp=_mpp_cell(cells.get("mpp", ""), where) or mpp,
                model=cells.get("model") or model,
            )
        )
    return jobs


def _mpp_cell(cell: str, where: str) -> float | None:
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        raise ConfigError(where, f"mpp {cell!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(where, f"mpp {cell!r} must be a positive number of micrometres")
    return value


def _is_url(text: str) -> bool:
    return "://" in text


def _check_slide(path: str, subject: str) -> str:
    if _is_url(path):
        return path
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise InputError(subject, "no such file or directory")
    return local


def _job(
    slide: str,
    out: Path,
    *,
    output: Path | None = None,
    mpp: float | None = None,
    model: str | None = None,
) -> SlideJob:
    if not _is_url(slide):
        slide = str(Path(slide).expanduser().absolute())
    target = (output if output is not None else out / output_name(slide)).absolute()
    return SlideJob(slide=slide, output=target, mpp=mpp, model=model)


def _check_unique_outputs(jobs: list[SlideJob]) -> None:
    seen: dict[Path, str] = {}
    for job in jobs:
        if job.output in seen:
            raise ConfigError(
                job.output,
                f"is the output of both {seen[job.output]} and {job.slide}",
                hint="rename one slide or give outputs in a manifest",
            )
        seen[job.output] = job.slide
