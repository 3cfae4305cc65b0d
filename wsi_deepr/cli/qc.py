"""``wsi-deepr qc SLIDE...``: where slides are blurred and by how much, without refocusing."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("qc")
@click.argument("slides", nargs=-1, required=True, type=click.Path(dir_okay=True, path_type=str))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Write focus_qc.json, focus_map.png and focus_qc.zarr here (one "
                   "sub-folder per slide when several are given).")  # fmt: skip
@click.option("--blur-stops", type=click.FloatRange(min=0, min_open=True), default=2.5,
              show_default=True,
              help="A cell is blurred when its focus score is below -STOPS.")  # fmt: skip
@click.option("--na", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Objective NA for the defocus estimate [0.75 brightfield, 0.95 "
                   "fluorescence].")  # fmt: skip
@click.option("--mpp", type=float, default=None,
              help="Pixel size in micrometres per pixel, overriding the file's.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary per slide.")
@click.option("--overwrite", is_flag=True, help="Replace earlier QC results in --out.")
def qc(
    slides: tuple[str, ...],
    out_dir: str | None,
    blur_stops: float,
    na: float | None,
    mpp: float | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Focus map and defocus estimate of each SLIDE (triage: fast, nothing refocused).

    Prints one line per slide: blurred share of the tissue, regions, median defocus.
    """
    from wsi_deepr.qc import qc_slide

    for slide in slides:
        target = None
        if out_dir is not None:
            target = Path(out_dir) if len(slides) == 1 else Path(out_dir) / Path(slide).stem
        result = qc_slide(slide, target, mpp=mpp, na=na, blur_stops=blur_stops, overwrite=overwrite)
        if as_json:
            click.echo(json.dumps(result.summary()))
        else:
            click.echo(result.one_line())
