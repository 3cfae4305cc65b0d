"""``wsi-deepr batch INPUT... --out DIR``: refocus many slides on one Dask cluster."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

LOG = logging.getLogger("wsi_deepr")


@click.command("batch")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder of the outputs (<slide>.zarr) and of batch.json.")  # fmt: skip
@click.option("--model", default=None, metavar="NAME|PATH",
              help="Shipped model name or .onnx file (a manifest's column wins).")  # fmt: skip
@click.option("--mpp", type=float, default=None,
              help="Pixel size in micrometres (a manifest's column wins).")  # fmt: skip
@click.option("--tile-px", type=click.IntRange(min=1), default=None,
              help="Model tile edge in pixels [default: 1024 on CPU, 512 on GPU].")  # fmt: skip
@click.option("--overlap-px", type=click.IntRange(min=0), default=64, show_default=True,
              help="Minimum overlap of neighbouring tiles in pixels.")  # fmt: skip
@click.option("--chunk-px", type=click.IntRange(min=1), default=None,
              help="Output chunk edge in pixels [default: near 2048].")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              default="auto", show_default=True, help="Where the model runs.")  # fmt: skip
@click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.5", show_default=True,
              help="OME-Zarr version of the outputs.")  # fmt: skip
@click.option("--no-tissue-mask", is_flag=True,
              help="Send every tile through the model, background included.")  # fmt: skip
@click.option("--strict", is_flag=True,
              help="Refuse slides whose pixel size lies outside the model's range.")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tiles per model call [default: 1 on the CPU, 8 on a GPU].")  # fmt: skip
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Run on an existing dask.distributed cluster (tcp://host:port).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local cluster processes [default: cores, at most 4].")  # fmt: skip
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads of each local worker process.")  # fmt: skip
@click.option("--slides-in-flight", type=click.IntRange(min=1), default=None,
              help="Slides run at the same time [default: cluster threads + 1].")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Recompute and replace existing outputs.")
@click.option("--resume", is_flag=True,
              help="Continue interrupted outputs from the chunks already written.")  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="Only the summary table.")
def batch(
    inputs: tuple[str, ...],
    out_dir: str,
    model: str | None,
    mpp: float | None,
    tile_px: int | None,
    overlap_px: int,
    chunk_px: int | None,
    device: str,
    ngff: str,
    no_tissue_mask: bool,
    strict: bool,
    batch_size: int | None,
    scheduler: str | None,
    workers: int | None,
    threads_per_worker: int,
    slides_in_flight: int | None,
    overwrite: bool,
    resume: bool,
    quiet: bool,
) -> None:
    """Refocus many slides (paths, globs, CSV manifests) into --out on one Dask cluster.

    Each slide goes to OUT/<name>.zarr (or the manifest's output column); slides whose
    output is already complete are skipped. Several slides run at once on one Dask
    cluster: --scheduler ADDRESS, or a local cluster of --workers processes. Prints a
    summary table, writes OUT/batch.json, and exits 2 (1 for an internal failure) when any
    slide failed, after all the others finished.
    """
    from wsi_deepr.batch import BATCH_JSON, SlideRecord, format_summary, run_batch
    from wsi_deepr.batch_inputs import collect_jobs

    if quiet:
        LOG.setLevel(max(LOG.level, logging.ERROR))
    if LOG.getEffectiveLevel() > logging.DEBUG:
        import distributed  # noqa: F401  (its import configures its loggers: override after)

        # distributed logs every worker start and stop at INFO; --debug shows them
        logging.getLogger("distributed").setLevel(logging.ERROR)
    jobs = collect_jobs(inputs, out_dir, mpp=mpp, model=model)

    def progress(record: SlideRecord) -> None:
        if quiet:
            return
        detail = record.error if record.status == "failed" else record.output
        click.echo(f"wsi-deepr: {record.status}: {Path(record.slide).name}: {detail}", err=True)

    result = run_batch(
        jobs,
        scheduler=scheduler,
        workers=workers,
        threads_per_worker=threads_per_worker,
        slides_in_flight=slides_in_flight,
        overwrite=overwrite,
        resume=resume,
        record_path=Path(out_dir) / BATCH_JSON,
        on_record=progress,
        model=model,
        tile_px=tile_px,
        overlap_px=overlap_px,
        chunk_px=chunk_px,
        device=device,
        ngff=ngff,
        tissue_mask=not no_tissue_mask,
        strict=strict,
        batch_size=batch_size,
    )
    click.echo(format_summary(result))
    if result.exit_code:
        sys.exit(result.exit_code)
