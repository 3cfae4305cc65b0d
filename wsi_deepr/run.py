"""Refocus a whole slide into an OME-Zarr pyramid: the library entry behind ``wsi-deepr run``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np

import wsi_deepr
from wsi_deepr.chunk_progress import ChunkProgress
from wsi_deepr.errors import OptionError, OutputError
from wsi_deepr.gpu_session import PRECISIONS, resolve_precision
from wsi_deepr.inference import CPU, Predictor, default_tile_px, plan_threads, select_provider
from wsi_deepr.local_dask import THREADS
from wsi_deepr.model_registry import resolve_model
from wsi_deepr.refocus import ChunkGraph, default_chunk_px
from wsi_deepr.report import Report
from wsi_deepr.slide import Slide
from wsi_deepr.tiling import TileGrid, plan_tiles
from wsi_deepr.writer import (
    REPORT_NAME,
    check_output_apart,
    check_resumable,
    create_pyramid,
    finish_pyramid,
    is_complete,
    mark_complete,
    prepare_output,
    pyramid_layout,
    stored_record,
    write_chunk_task,
)

LOG = logging.getLogger("wsi_deepr")


def refocus_slide(
    input: str | Path | Slide,
    output: str | Path,
    *,
    model: str | Path | None = None,
    tile_px: int | None = None,
    overlap_px: int = 64,
    device: str = "auto",
    ngff: str = "0.5",
    tissue_mask: bool = True,
    scheduler: str | Any | None = None,
    overwrite: bool = False,
    mpp: float | None = None,
    strict: bool = False,
    batch_size: int | None = None,
    chunk_px: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    resume: bool = False,
    only_blurred: float | None = None,
    qc: bool = False,
    precision: str | None = None,
) -> Report:
    """Refocus a slide with a Deep-R generator and write an OME-Zarr pyramid.

    Parameters
    ----------
    input : str or Path or Slide
        A slide file or store (read with :func:`wsi_deepr.readers.open_slide`) or an
        already opened :class:`~wsi_deepr.slide.Slide`.
    output : str or Path
        The OME-Zarr store to create.
    model : str or Path, optional
        A shipped model's name or a path to an ``.onnx`` file; by default the shipped
        model for the slide's modality.
    tile_px : int, optional
        Model tile edge in pixels: by default 1024 on the CPU and 512 on GPUs and with
        ``only_blurred`` (:func:`wsi_deepr.inference.default_tile_px`), shrunk where the
        same number of tiles covers the slide with smaller ones (:meth:`TileGrid.fitted`).
    overlap_px : int
        Minimum overlap of neighbouring tiles in pixels.
    device : {"auto", "cpu", "cuda", "tensorrt"}
        Where the model runs.
    ngff : {"0.5", "0.4"}
        OME-Zarr version (0.5 on zarr v3, 0.4 on zarr v2).
    tissue_mask : bool
        Send only tiles that touch tissue through the model.
    scheduler : str or distributed.Client, optional
        Address of a running ``dask.distributed`` scheduler, or a client; the local
        threaded scheduler by default.
    overwrite : bool
        Replace an existing output store.
    mpp : float, optional
        Pixel size in micrometres, overriding the file's.
    strict : bool
        Refuse a slide whose pixel size lies outside the model card's range.
    batch_size : int, optional
        Tiles per model call: 1 on the CPU (batching only costs memory there), 8 on a GPU
        (where it is also TensorRT's optimisation profile).
    chunk_px : int, optional
        Edge of the output chunks (a multiple of the tile stride near 2048 by default).
    workers : int, optional
        Local Dask threads; ONNX Runtime gets ``cores // workers`` threads each.
    progress : bool
        Show a progress bar on stderr.
    resume : bool
        Continue an interrupted run in ``output`` (same model, tiles and slide): chunks
        it stored are kept, only the rest is computed, and the result equals an
        uninterrupted run's bit for bit. A finished ``output`` is left as it is and its
        report returned; a missing one is started afresh.
    only_blurred : float, optional
        Run the model only on tiles over blurred tissue: focus score below minus this
        many stops (:mod:`wsi_deepr.focus`); writes the input focus map and PNG.
    qc : bool
        Also estimate the defocus, map the output's focus and check the output against
        the input (:mod:`wsi_deepr.qc`).
    precision : {"auto", "fp32", "fp16"}, optional
        Arithmetic of the model: by default fp16 on CUDA and TensorRT, fp32 on the CPU
        (:mod:`wsi_deepr.gpu_session`); an int8 model runs as it is. Recorded in
        ``report.json``.

    Returns
    -------
    Report
        Also written as ``report.json`` inside the store.

    Raises
    ------
    WsiDeeprError
        Any user-facing problem (input, model, options, output), before anything is
        written where possible.

    Examples
    --------
    >>> report = refocus_slide("slide.svs", "out.zarr", model="model.onnx")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    started = time.perf_counter()
    if tile_px is not None:
        TileGrid(int(tile_px), int(overlap_px))  # bad tiling is refused before any work
    if ngff not in ("0.4", "0.5"):
        raise OptionError("--ngff", f"must be 0.4 or 0.5, got {ngff!r}")
    if resume and overwrite:
        raise OptionError("--resume", "contradicts --overwrite; pass one of them")
    if precision not in (None, "auto", *PRECISIONS):
        raise OptionError("--precision", f"must be auto, fp32 or fp16, got {precision!r}")
    if not isinstance(input, Slide):
        check_output_apart(str(input), str(output))
    out = prepare_output(output, overwrite=overwrite, resume=resume)
    if resume and is_complete(out):
        LOG.info("%s: already complete; nothing to resume", out)
        return Report.read(out / REPORT_NAME)
    earlier = stored_record(out) if resume and out.exists() else None
    if resume and out.exists() and earlier is None:
        raise OutputError(out, "is not an interrupted wsi-deepr run; not resumed",
                          hint="pass --overwrite to replace it")  # fmt: skip
    if earlier is not None:
        # The interrupted run's tiling, chunking and batching, unless asked otherwise (a
        # different choice is refused below, as any other change of settings).
        stored = earlier.get("parameters", {})
        chunk_px = chunk_px or stored.get("chunk_px")
        tile_px = tile_px or stored.get("tile_px")
        batch_size = batch_size or stored.get("batch_size")
    if isinstance(input, Slide):
        slide = input
    else:
        from wsi_deepr.readers import open_slide

        slide = open_slide(input, mpp=mpp)
    # A named model is checked before any cluster starts; the default one needs the provider.
    named = resolve_model(model, slide, strict=strict) if model is not None else None
    with _scheduler(scheduler, workers) as (compute, scheduler_name, n_workers, ort_threads,
                                            on_worker):  # fmt: skip
        # Chosen and checked where the model runs: on a cluster, on one of its workers
        # (a submitting machine without GPUs must not decide for GPU workers). Without
        # --model, the provider picks the shipped variant (int8 on the CPU).
        provider = on_worker(select_provider, device)
        resolved = named or resolve_model(None, slide, strict=strict, provider=provider)
        card = resolved.card
        if tile_px is not None:
            grid = TileGrid(int(tile_px), int(overlap_px))
        else:  # the device's tile, shrunk to the fewest pixels for as many tiles
            tile = default_tile_px(provider, selective=only_blurred is not None)
            grid = TileGrid(tile, int(overlap_px)).fitted(slide.shape_yx)
        grid.check_model(min_tile_px=card.size_multiple)
        if batch_size is None:
            batch_size = 1 if provider == CPU else 8
        predictor = on_worker(_checked_predictor, resolved, provider, ort_threads,
                              resolve_precision(precision, provider), batch_size,
                              grid.tile_px)  # fmt: skip

        from wsi_deepr.tissue import intensity_stats
        from wsi_deepr.tissue import tissue_mask as find_tissue

        mask = np.asarray(find_tissue(slide), dtype=bool)
        mean, std = intensity_stats(slide, mask)
        plan = plan_tiles(
            slide.shape_yx, grid, mask=mask, mask_downsample=slide.thumbnail_downsample
        )
        if not tissue_mask:
            plan = dataclasses.replace(plan, tissue=np.ones_like(plan.tissue))
        focus_qc = None
        if qc or only_blurred is not None:
            from wsi_deepr.qc import RunQc

            focus_qc = RunQc.start(
                slide, mask, na=card.objective_na, blur_stops=only_blurred, full=qc
            )
            if only_blurred is not None:
                # Crops change the model's input shape from tile to tile: only where a
                # session takes any shape at no cost (GPU sessions are built for one).
                plan = focus_qc.select(plan, crop=provider == CPU)
        tissue_mm2 = float(mask.mean()) * slide.area_mm2 if mask.size else 0.0
        prepared_s = time.perf_counter() - started
        LOG.info(
            "%s: %d x %d px, %.2f mm2, %d tiles (%d through the model), %s",
            slide.path, slide.shape_yx[1], slide.shape_yx[0], slide.area_mm2,
            plan.n_tiles, plan.n_run, provider,
        )  # fmt: skip

        chunk = chunk_px or default_chunk_px(
            grid, shape_yx=slide.shape_yx, min_chunks=2 * n_workers
        )
        graph = ChunkGraph(
            slide.data, plan, predictor, mean=mean, std=std, chunk_px=chunk, batch_size=batch_size
        )
        parameters = {
            "model": str(model) if model is not None else None,
            "tile_px": grid.tile_px,
            "overlap_px": grid.overlap_px,
            "device": device,
            "provider": provider,
            "precision": predictor.precision,
            "ngff": ngff,
            "tissue_mask": tissue_mask,
            "scheduler": scheduler_name,
            "workers": n_workers,
            "ort_threads": ort_threads,
            "batch_size": batch_size,
            "chunk_px": chunk,
            "mpp": mpp,
            "strict": strict,
            "only_blurred": only_blurred,
            "qc": qc,
        }
        normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        provenance: dict[str, Any] = {
            "package_version": wsi_deepr.__version__,
            "model": {"name": card.name, "sha256": resolved.sha256, "path": str(resolved.path)},
            "parameters": parameters,
            "input": {
                "path": str(slide.path),
                "mpp": slide.mpp,
                "shape_cyx": list(slide.data.shape),
                "dtype": str(slide.dtype),
                "format": slide.format_name,
                "normalization": normalization,
            },
            "resume_key": {
                "model_sha256": resolved.sha256,
                "tile_px": grid.tile_px,
                "overlap_px": grid.overlap_px,
                "chunk_px": chunk,
                "batch_size": batch_size,
                "ngff": ngff,
                "shape_cyx": list(slide.data.shape),
                "dtype": str(slide.dtype),
                "mpp": slide.mpp,
                "normalization": normalization,
                "tiles_run_sha256": _digest(np.packbits(plan.tissue)),
                # --only-blurred: which part of each tile ran and where its output is used
                "crops_sha256": _digest(plan.crops),
                "refocus_cells_sha256": _digest(plan.cells),
            },
        }
        layout = pyramid_layout(out, slide.data.shape, slide.dtype, (chunk, chunk), ngff=ngff)
        if earlier is not None:
            done = check_resumable(layout, provenance["resume_key"])
            before = earlier.get("parameters", {}).get("provider")
            if before != provider:
                LOG.warning("%s: resumed with %s; chunks written before used %s",
                            out, provider, before)  # fmt: skip
            # (stores written before precision was recorded say nothing: no warning)
            before = earlier.get("parameters", {}).get("precision")
            if before is not None and before != predictor.precision:
                LOG.warning("%s: resumed in %s; chunks written before are %s",
                            out, predictor.precision, before)  # fmt: skip
            LOG.info("%s: resuming, %d of %d chunks already stored", out, len(done),
                     graph.n_chunks)  # fmt: skip
        else:
            create_pyramid(layout, provenance)
            done = frozenset()
        blocks = graph.blocks(done=done, progress=ChunkProgress(out))
        write = dask.delayed(write_chunk_task, pure=True)
        tasks = [
            write(block, tiles_run, layout, graph.chunk_origin(a, b), (a, b))
            for (a, b), (block, tiles_run) in blocks.items()
        ]
        level0_started = time.perf_counter()
        tiles_run_now = int(sum(_with_progress(compute, progress)(tasks)))
        level0_s = time.perf_counter() - level0_started
        pyramid_s = finish_pyramid(
            layout, mpp=slide.mpp, channel_names=slide.channel_names,
            channel_colors=slide.channel_colors, name=Path(str(slide.path)).name,
            compute=compute,
        )  # fmt: skip

    qc_summary = focus_qc.finish(out, plan, level0_path=layout.level_paths[0]) if focus_qc else {}
    seconds = time.perf_counter() - started
    report = Report(
        input_path=str(slide.path),
        output_path=str(out),
        shape_cyx=(slide.n_channels, *slide.shape_yx),
        mpp=slide.mpp,
        area_mm2=slide.area_mm2,
        tissue_mm2=tissue_mm2,
        tiles_run=plan.n_run,
        tiles_skipped=plan.n_skipped,
        seconds=seconds,
        model_seconds=level0_s,
        pyramid_seconds=pyramid_s,
        device=device,
        provider=provider,
        model_name=card.name,
        model_sha256=resolved.sha256,
        tile_px=grid.tile_px,
        overlap_px=grid.overlap_px,
        workers=n_workers,
        ort_threads=ort_threads,
        scheduler=scheduler_name,
        extra={"levels": [list(s) for s in layout.level_shapes], "chunk_px": chunk,
               "batch_size": batch_size, "precision": predictor.precision,
               "report": REPORT_NAME,
               "chunks_total": graph.n_chunks, "chunks_reused": len(done),
               "chunks_computed": len(blocks), "tiles_run_now": tiles_run_now,
               **({"focus_qc": qc_summary} if qc_summary else {})},
    )  # fmt: skip
    provenance["timings"] = {
        "prepare_s": prepared_s,
        "level0_s": level0_s,
        "pyramid_s": pyramid_s,
        "total_s": seconds,
    }
    mark_complete(out, report.to_dict(), provenance)
    LOG.info("%s", report.summary())
    return report


Compute = Any


def _digest(values: np.ndarray | None) -> str | None:
    """sha256 of an array's bytes (``None`` stays ``None``)."""
    return None if values is None else hashlib.sha256(values.tobytes()).hexdigest()


def _checked_predictor(
    resolved: Any, provider: str, threads: int, precision: str, batch_size: int, tile_px: int
) -> Predictor:
    return Predictor.for_model(resolved, provider=provider, threads=threads,
                               precision=precision, batch_size=batch_size,
                               tile_px=tile_px)  # fmt: skip


@contextlib.contextmanager
def _scheduler(
    scheduler: str | Any | None, workers: int | None
) -> Iterator[tuple[Compute, str, int, int, Callable[..., Any]]]:
    """How to run the graph.

    Yields ``(compute, name, worker threads, ORT threads per session, on_worker)``;
    ``on_worker(f, *args)`` returns ``f(*args)`` computed where the tiles will run (here,
    or on one worker of the cluster).
    """

    if scheduler is None:
        n_workers, ort_threads = plan_threads(workers=workers)

        def compute_local(graph: Any) -> Any:
            return dask.compute(graph, scheduler=THREADS, num_workers=n_workers)[0]

        def here(function: Callable[..., Any], *args: Any) -> Any:
            return function(*args)

        yield compute_local, "threads", n_workers, ort_threads, here
        return

    from distributed import Client

    own_client = not isinstance(scheduler, Client)
    client: Any
    if own_client:
        try:
            client = Client(str(scheduler), timeout="20s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise OptionError("--scheduler", f"cannot connect to {scheduler}: {exc}") from exc
    else:
        client = scheduler
    try:
        n_threads = sum(client.nthreads().values()) or 1
        # Cluster threads each run their own ORT session; one ORT thread each keeps
        # workers x threads within the cores the cluster was given.
        ort_threads = 1

        def compute_cluster(graph: Any) -> Any:
            return client.compute(graph, sync=True)

        def on_a_worker(function: Callable[..., Any], *args: Any) -> Any:
            return client.submit(function, *args, pure=False).result()

        yield compute_cluster, str(client.scheduler.address), n_threads, ort_threads, on_a_worker
    finally:
        if own_client:
            client.close()


def _with_progress(compute: Compute, progress: bool) -> Compute:
    if not progress:
        return compute

    def run(graph: Any) -> Any:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr, minimum=1.0):
            return compute(graph)

    return run
