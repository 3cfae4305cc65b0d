"""Example: a wsi-deepr batch on SLURM GPU nodes through dask-jobqueue (one GPU per job).

Each SLURM job runs one Dask worker process with one thread and one GPU (``--gres=gpu:1``;
SLURM sets ``CUDA_VISIBLE_DEVICES`` for the job, so no further pinning is needed). This
script starts the scheduler in its own process, submits ``--jobs`` worker jobs and runs
the batch on them; the jobs end when it exits.

    pip install dask-jobqueue
    python pipelines/slurm_cluster.py '/data/slides/*.svs' --out /data/refocused \\
        --jobs 8 --partition gpu --walltime 04:00:00 --model deepr-he-20x
    python pipelines/slurm_cluster.py ... --dry-run      # print the job script only

Run this driver where ``--device cuda`` loads (inside a GPU allocation, e.g.
``srun --gres=gpu:1 --pty python pipelines/slurm_cluster.py ...``): wsi-deepr checks the
execution provider on the submitting side before sending work to the workers. Workers need
the same Python environment (``--python``) and the slides and output folder on a shared
file system. Adjust ``--setup`` to what your site loads (modules, a venv).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def make_cluster(options: argparse.Namespace) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` of single-GPU, single-thread worker jobs."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        sys.exit(
            "slurm_cluster: error: dask-jobqueue is not installed; "
            "run `pip install dask-jobqueue` in the environment the workers use"
        )
    return SLURMCluster(
        queue=options.partition,
        account=options.account,
        cores=1,  # one worker thread: one model call at a time on the job's GPU ...
        processes=1,  # ... in one worker process per job
        job_cpu=options.cores,  # CPU cores booked (ONNX Runtime, reading, writing)
        memory=options.memory,
        walltime=options.walltime,
        job_extra_directives=["--gres=gpu:1"],
        job_script_prologue=options.setup,
        python=options.python,
        log_directory=options.log_directory,
    )


def main(argv: list[str] | None = None) -> int:
    """Start the cluster, run the batch, print its summary; returns the batch exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="slides, globs or CSV manifests")
    parser.add_argument("--out", required=True, help="output folder (on a shared file system)")
    parser.add_argument("--model", default=None, help="model name or .onnx path")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM worker jobs (GPUs)")
    parser.add_argument("--partition", default=None, help="SLURM partition with GPUs")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--cores", type=int, default=4, help="CPU cores per job")
    parser.add_argument("--memory", default="32GB", help="memory per job")
    parser.add_argument("--walltime", default="04:00:00", help="time limit per job")
    parser.add_argument("--python", default=sys.executable, help="python of the workers")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before each worker (repeatable)")  # fmt: skip
    parser.add_argument("--log-directory", default=None, help="folder of the job logs")
    parser.add_argument("--resume", action="store_true", help="continue interrupted outputs")
    parser.add_argument("--dry-run", action="store_true", help="print the job script only")
    options = parser.parse_args(argv)

    cluster = make_cluster(options)
    if options.dry_run:
        print(cluster.job_script())
        cluster.close()
        return 0

    from distributed import Client

    from wsi_deepr.batch import BATCH_JSON, format_summary, run_batch
    from wsi_deepr.batch_inputs import collect_jobs

    jobs = collect_jobs(options.inputs, options.out, model=options.model)
    with cluster, Client(cluster) as client:
        cluster.scale(jobs=options.jobs)
        client.wait_for_workers(1, timeout=3600)  # the queue decides when jobs start
        result = run_batch(
            jobs,
            scheduler=client,
            model=options.model,
            device="cuda",
            resume=options.resume,
            slides_in_flight=options.jobs + 1,  # workers join as the queue starts them
            record_path=f"{options.out}/{BATCH_JSON}",
        )
    print(format_summary(result))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
