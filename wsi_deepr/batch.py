"""Refocus many slides on one Dask cluster: the library entry behind ``wsi-deepr batch``.

Several slides are in flight at once: a thread per slide calls
:func:`wsi_deepr.run.refocus_slide` with the shared ``distributed.Client``, so the
cluster's workers take chunks of all of them. A slide that fails is recorded with its
reason and the others go on; a slide whose output is already complete is skipped. A
worker that dies mid-job loses nothing: the scheduler reruns its tasks elsewhere, and the
tasks write their output chunks idempotently.

``device="auto"`` is probed once for the whole batch (one log line, not one per slide) and
the slides run with the provider it found; ``batch.json`` keeps both. Without
``scheduler`` a local cluster is started: ``workers`` worker *processes* (started
with ``spawn``, distributed's default, so no CUDA state is inherited through ``fork``) with
``threads_per_worker`` threads each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import wsi_deepr
from wsi_deepr.batch_inputs import SlideJob
from wsi_deepr.errors import OptionError, OutputError, WsiDeeprError

LOG = logging.getLogger("wsi_deepr")

BATCH_JSON = "batch.json"
"""The batch record written into the output folder."""

Status = Literal["done", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class SlideRecord:
    """What happened to one slide of a batch."""

    slide: str
    """The slide."""
    output: str
    """Its OME-Zarr store."""
    status: Status
    """``done`` (refocused now), ``failed`` or ``skipped`` (output already complete)."""
    error: str | None = None
    """Why it failed, in one line."""
    exit_code: int = 0
    """The failure's exit code: 2 for bad input, 1 for an internal failure."""
    area_mm2: float | None = None
    """Area of the slide's level 0 (from its report; also for skipped slides)."""
    seconds: float | None = None
    """Wall time of this slide in this batch (``None`` when skipped)."""
    s_per_mm2: float | None = None
    """``seconds / area_mm2``."""
    device: str | None = None
    """``--device`` as asked."""
    provider: str | None = None
    """ONNX Runtime execution provider used."""
    model: str | None = None
    """Model name from its card."""
    chunks_reused: int | None = None
    """Output chunks kept from an interrupted run (``--resume``) instead of recomputed."""
    report: dict[str, Any] | None = None
    """The slide's full report (``report.json``)."""


@dataclass(slots=True)
class BatchResult:
    """All records of a batch and its totals."""

    records: list[SlideRecord]
    """One per slide, in input order."""
    seconds: float
    """Wall time of the whole batch, cluster start included."""
    scheduler: str
    """Address of the scheduler."""
    worker_threads: int
    """Threads of the cluster when the batch started."""
    slides_in_flight: int
    """Slides run at the same time."""
    started_utc: str = ""
    """ISO time the batch started."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Options of the batch."""

    def count(self, status: Status) -> int:
        """Number of slides with a status."""
        return sum(r.status == status for r in self.records)

    @property
    def area_mm2_done(self) -> float:
        """Area of the slides refocused by this batch."""
        return sum(r.area_mm2 or 0.0 for r in self.records if r.status == "done")

    @property
    def slides_per_hour(self) -> float | None:
        """Slides refocused per hour of batch wall time."""
        done = self.count("done")
        return done * 3600.0 / self.seconds if done and self.seconds > 0 else None

    @property
    def s_per_mm2(self) -> float | None:
        """Batch wall time per square millimetre refocused (all slides together)."""
        area = self.area_mm2_done
        return self.seconds / area if area > 0 else None

    @property
    def exit_code(self) -> int:
        """0 when no slide failed; 1 when any failure was internal; otherwise 2."""
        codes = [r.exit_code for r in self.records if r.status == "failed"]
        if not codes:
            return 0
        return 1 if 1 in codes else 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, totals included."""
        return {
            "package_version": wsi_deepr.__version__,
            "started_utc": self.started_utc,
            "seconds": self.seconds,
            "scheduler": self.scheduler,
            "worker_threads": self.worker_threads,
            "slides_in_flight": self.slides_in_flight,
            "counts": {s: self.count(s) for s in ("done", "failed", "skipped")},
            "area_mm2_done": self.area_mm2_done,
            "slides_per_hour": self.slides_per_hour,
            "s_per_mm2": self.s_per_mm2,
            "exit_code": self.exit_code,
            "options": self.extra,
            "slides": [asdict(r) for r in self.records],
        }


def run_batch(
    jobs: Sequence[SlideJob],
    *,
    scheduler: str | Any | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    slides_in_flight: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    record_path: str | Path | None = None,
    on_record: Callable[[SlideRecord], None] | None = None,
    **options: Any,
) -> BatchResult:
    """Refocus slides on one cluster, several at once; never stop at a failed slide.

    Parameters
    ----------
    jobs : sequence of SlideJob
        The slides and their outputs (:func:`wsi_deepr.batch_inputs.collect_jobs`).
    scheduler : str or distributed.Client, optional
        Address of a running scheduler, or a client; a local cluster when ``None``.
    workers : int, optional
        Worker processes of the local cluster (default: the cores, at most 4).
    threads_per_worker : int
        Threads of each local worker process.
    slides_in_flight : int, optional
        Slides run at the same time (default: the cluster's threads + 1, so a slide's
        client-side steps overlap the others' chunks).
    overwrite : bool
        Recompute complete outputs and replace existing stores.
    resume : bool
        Continue interrupted outputs from the chunks their stores prove written.
    record_path : str or Path, optional
        Where the batch record is written (atomically) after every slide and at the end.
    on_record : callable, optional
        Called with each record as its slide finishes (from worker threads).
    **options
        Passed to :func:`wsi_deepr.run.refocus_slide` (``model``, ``tile_px``,
        ``overlap_px``, ``device``, ``ngff``, ``tissue_mask``, ``strict``,
        ``batch_size``, ``chunk_px``); a job's own ``model`` and ``mpp`` win.

    Returns
    -------
    BatchResult

    Raises
    ------
    OptionError
        Contradicting options, or a scheduler that cannot be reached.
    """
    if overwrite and resume:
        raise OptionError("--resume", "contradicts --overwrite (which recomputes everything)")
    if scheduler is not None and workers is not None:
        raise OptionError("--workers", "applies to the local cluster; not with --scheduler")
    device_asked = options.get("device", "auto")
    options = _resolve_device(options)
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    records: dict[int, SlideRecord] = {}
    lock = threading.Lock()
    extra = {"overwrite": overwrite, "resume": resume, **_jsonable(options),
             "device_asked": device_asked}  # fmt: skip

    pin_gpus = options.get("device") in ("cuda", "tensorrt")
    with _client(scheduler, workers, threads_per_worker, pin_gpus=pin_gpus) as client:
        n_threads = sum(client.nthreads().values()) or 1
        in_flight = max(1, min(len(jobs), slides_in_flight or n_threads + 1))
        LOG.info(
            "batch: %d slides on %s (%d worker threads), %d in flight",
            len(jobs), client.scheduler.address, n_threads, in_flight,
        )  # fmt: skip

        def result() -> BatchResult:
            return BatchResult(
                records=[records[i] for i in sorted(records)],
                seconds=time.perf_counter() - started,
                scheduler=str(client.scheduler.address),
                worker_threads=n_threads,
                slides_in_flight=in_flight,
                started_utc=started_utc,
                extra=extra,
            )

        def finish(index: int, record: SlideRecord) -> None:
            with lock:
                records[index] = record
                if record_path is not None:
                    write_record(result(), record_path)
            if on_record is not None:
                on_record(record)

        pool = ThreadPoolExecutor(in_flight, thread_name_prefix="wsi-deepr-slide")
        try:
            futures = {
                pool.submit(
                    _run_one, job, client=client, overwrite=overwrite, resume=resume,
                    options=options,
                ): k
                for k, job in enumerate(jobs)
            }  # fmt: skip
            for future in as_completed(futures):
                finish(futures[future], future.result())
        except BaseException:
            # Ctrl-C: start no further slide; closing the client below ends those in
            # flight (their stores stay incomplete, for --resume), instead of waiting.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        final = result()
    if record_path is not None:
        write_record(final, record_path)
    return final


def _resolve_device(options: dict[str, Any]) -> dict[str, Any]:
    """Probe ``device="auto"`` once for the batch (it logs its choice once, not per slide)."""
    from wsi_deepr.inference import CPU, CUDA, TENSORRT, select_provider

    if options.get("device", "auto") != "auto":
        return options
    provider = select_provider("auto")
    device = {CPU: "cpu", CUDA: "cuda", TENSORRT: "tensorrt"}[provider]
    return {**options, "device": device}


def _run_one(
    job: SlideJob, *, client: Any, overwrite: bool, resume: bool, options: dict[str, Any]
) -> SlideRecord:
    """Run one slide; every failure becomes a record (the batch goes on)."""
    from wsi_deepr.run import refocus_slide
    from wsi_deepr.writer import REPORT_NAME, is_complete

    if not overwrite and is_complete(job.output):
        stored = _read_json(job.output / REPORT_NAME)
        LOG.info("%s: skipped, %s is complete", job.slide, job.output)
        return _record(job, "skipped", report=stored)
    kwargs = dict(options)
    if job.model is not None:
        kwargs["model"] = job.model
    if job.mpp is not None:
        kwargs["mpp"] = job.mpp
    started = time.perf_counter()
    try:
        report = refocus_slide(
            job.slide, job.output, scheduler=client, overwrite=overwrite, resume=resume, **kwargs
        )
    except WsiDeeprError as exc:
        LOG.info("%s: failed: %s", job.slide, exc.one_line())
        return _failed(job, exc.one_line(), exc.exit_code, time.perf_counter() - started)
    except Exception as exc:  # the batch must go on; the record says what broke
        LOG.debug("%s: failed", job.slide, exc_info=True)
        message = f"{type(exc).__name__}: {_first_line(exc)}"
        return _failed(job, f"{job.slide}: {message}", 1, time.perf_counter() - started)
    return _record(job, "done", report=report.to_dict(), seconds=report.seconds)


def _record(
    job: SlideJob, status: Status, *, report: dict[str, Any] | None, seconds: float | None = None
) -> SlideRecord:
    report = report or {}
    area = report.get("area_mm2")
    return SlideRecord(
        slide=job.slide,
        output=str(job.output),
        status=status,
        area_mm2=area,
        seconds=seconds,
        s_per_mm2=seconds / area if seconds is not None and area else None,
        device=report.get("device"),
        provider=report.get("provider"),
        model=report.get("model_name"),
        chunks_reused=(report.get("extra") or {}).get("chunks_reused"),
        report=report or None,
    )


def _failed(job: SlideJob, error: str, exit_code: int, seconds: float) -> SlideRecord:
    return SlideRecord(
        slide=job.slide,
        output=str(job.output),
        status="failed",
        error=error,
        exit_code=exit_code,
        seconds=seconds,
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        for k, v in options.items()
    }


@contextlib.contextmanager
def _client(
    scheduler: str | Any | None, workers: int | None, threads: int, *, pin_gpus: bool = False
) -> Iterator[Any]:
    """A client of the given scheduler, or of a local cluster started (and closed) here."""
    from distributed import Client

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler is not None:
        try:
            client = Client(str(scheduler), timeout="20s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise OptionError("--scheduler", f"cannot connect to {scheduler}: {exc}") from exc
        with client:
            yield client
        return
    with (
        local_cluster(workers, threads) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(len(cluster.workers), timeout=120)
        yield client


def default_workers() -> int:
    """Worker processes of a local cluster: one per core, at most 4."""
    from wsi_deepr.inference import available_cores

    return max(1, min(4, available_cores()))


@contextlib.contextmanager
def local_cluster(
    workers: int | None = None, threads_per_worker: int = 1, *, pin_gpus: bool = False
) -> Iterator[Any]:
    """A ``distributed.LocalCluster`` of worker processes (spawned, never forked).

    Parameters
    ----------
    workers : int, optional
        Worker processes (:func:`default_workers` by default).
    threads_per_worker : int
        Threads per worker process.
    pin_gpus : bool
        Give worker ``k`` the ``k``-th GPU (:mod:`wsi_deepr.gpu_pinning`).

    Yields
    ------
    distributed.LocalCluster
    """
    import dask
    from distributed import LocalCluster

    n_workers = workers or default_workers()
    if n_workers < 1 or threads_per_worker < 1:
        raise OptionError("--workers", "needs at least one worker with one thread")
    # 'spawn' is distributed's default; pin it so a site config cannot switch a GPU
    # worker to 'fork' (a forked child inherits a CUDA context it cannot use).
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}),
        _workers_ignore_ctrl_c(),
    ):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=":0",  # a free port: 8787 may belong to another cluster
            silence_logs=logging.ERROR,
            preload=["wsi_deepr.gpu_pinning"] if pin_gpus else [],
        )
    with cluster:
        LOG.info("local cluster: %d workers, dashboard %s", n_workers, cluster.dashboard_link)
        yield cluster


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (inherited through spawn's exec).

    Ctrl-C reaches the whole process group: the batch then closes the cluster itself,
    instead of every worker dying with a KeyboardInterrupt traceback. Only possible from
    the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_record(result: BatchResult, path: str | Path) -> Path:
    """Write the batch record as JSON atomically (a temporary file, then a rename).

    Raises
    ------
    OutputError
        The folder cannot be written.
    """
    target = Path(path)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise OutputError(target, f"cannot write the batch record: {exc.strerror or exc}") from exc
    return target


def format_summary(result: BatchResult) -> str:
    """The summary table: one row per slide, then the totals.

    Parameters
    ----------
    result : BatchResult

    Returns
    -------
    str
        Lines without a trailing newline.
    """
    header = ("slide", "status", "area_mm2", "seconds", "s_per_mm2", "provider", "error")
    rows = [header]
    for r in result.records:
        rows.append(
            (
                Path(r.slide).name,
                r.status,
                _num(r.area_mm2, 3),
                _num(r.seconds, 1),
                _num(r.s_per_mm2, 2),
                (r.provider or "").removesuffix("ExecutionProvider"),
                r.error or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    lines = [line.rstrip() for line in lines]
    lines.append(
        f"{len(result.records)} slides: {result.count('done')} done, "
        f"{result.count('failed')} failed, {result.count('skipped')} skipped; "
        f"{result.area_mm2_done:.2f} mm2 in {result.seconds:.1f} s "
        f"({_num(result.s_per_mm2, 2)} s/mm2, {_num(result.slides_per_hour, 1)} slides/hour) "
        f"on {result.worker_threads} worker threads"
    )
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
