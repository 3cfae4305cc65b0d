"""``wsi-deepr run SLIDE OUT.zarr``: refocus a whole slide into an OME-Zarr pyramid."""

from __future__ import annotations

import logging
import sys

import click

LOG = logging.getLogger("wsi_deepr")


@click.command("run")
@click.argument("slide", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@click.option(
    "--model",
    "model",
    metavar="NAME|PATH",
    default=None,
    help="Shipped model name or an .onnx file (default: the shipped model for the slide).",
)
@click.option("--tile-px", type=click.IntRange(min=1), default=None,
              help="Model tile edge in pixels [default: 1024 on CPU, 512 on GPU and "
                   "with --only-blurred].")  # fmt: skip
@click.option("--overlap-px", type=click.IntRange(min=0), default=64, show_default=True,
              help="Minimum overlap of neighbouring tiles in pixels (< tile/2).")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              default="auto", show_default=True, help="Where the model runs.")  # fmt: skip
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16"]), default="auto",
              show_default=True,
              help="Model arithmetic: auto is fp16 on CUDA/TensorRT, fp32 on the CPU; an "
                   "int8 model runs as it is.")  # fmt: skip
@click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.5", show_default=True,
              help="OME-Zarr version: 0.5 (zarr v3) or 0.4 (zarr v2, older viewers).")  # fmt: skip
@click.option("--no-tissue-mask", is_flag=True,
              help="Send every tile through the model, background included.")  # fmt: skip
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Run on an existing dask.distributed cluster (tcp://host:port).")  # fmt: skip
@click.option("--mpp", type=float, default=None,
              help="Pixel size in micrometres per pixel, overriding the file's.")  # fmt: skip
@click.option("--strict", is_flag=True,
              help="Refuse a slide outside the model card's pixel sizes or modality.")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tiles per model call [default: 1 on the CPU, 8 on a GPU].")  # fmt: skip
@click.option("--chunk-px", type=click.IntRange(min=1), default=None,
              help="Output chunk edge in pixels [default: a multiple of the tile stride "
              "near 2048].")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker threads [default: from the cores].")  # fmt: skip
@click.option("--only-blurred", "only_blurred", type=click.FloatRange(min=0, min_open=True),
              is_flag=False, flag_value=2.5, default=None, metavar="[STOPS]",
              help="Refocus only tiles over blurred tissue: focus score below -STOPS "
                   "[2.5]; writes the focus map.")  # fmt: skip
@click.option("--qc", is_flag=True,
              help="Write focus maps (input, output), defocus map, focus_map.png.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output store.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in OUTPUT, computing only the rest.")  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
def run(
    slide: str,
    output: str,
    model: str | None,
    tile_px: int | None,
    overlap_px: int,
    device: str,
    precision: str,
    ngff: str,
    no_tissue_mask: bool,
    scheduler: str | None,
    mpp: float | None,
    strict: bool,
    batch_size: int | None,
    chunk_px: int | None,
    workers: int | None,
    only_blurred: float | None,
    qc: bool,
    overwrite: bool,
    resume: bool,
    quiet: bool,
) -> None:
    """Refocus SLIDE with a Deep-R generator and write the OME-Zarr pyramid OUTPUT.

    Writes OUTPUT/report.json (area, tiles, s/mm2, provider, model) and marks the store
    complete last; prints one summary line.
    """
    from wsi_deepr.run import refocus_slide

    if quiet:
        LOG.setLevel(max(LOG.level, logging.ERROR))
    report = refocus_slide(
        slide,
        output,
        model=model,
        tile_px=tile_px,
        overlap_px=overlap_px,
        device=device,
        precision=precision,
        ngff=ngff,
        tissue_mask=not no_tissue_mask,
        scheduler=scheduler,
        overwrite=overwrite,
        mpp=mpp,
        strict=strict,
        batch_size=batch_size,
        chunk_px=chunk_px,
        workers=workers,
        resume=resume,
        only_blurred=only_blurred,
        qc=qc,
        progress=not quiet and sys.stderr.isatty(),
    )
    if not quiet:
        click.echo(report.summary())
