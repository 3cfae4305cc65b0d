"""Scheduled job: refocus the new slides of an inbox folder as one ``wsi-deepr batch``.

Safe to run from cron or a systemd timer:

- a lock file (``flock``, released by the kernel even if the job is killed) makes a run
  that starts while the previous one is still busy exit at once with status 0;
- slides whose output is complete (its completion record) are left alone, so each run
  picks up only what is new; an output left incomplete by a crash is continued
  (``--resume``), recomputing only the chunks its store does not prove written;
- files modified within ``--settle-s`` seconds are left for the next run (still being
  copied in); hidden files and ``*.part``/``*.tmp`` are ignored.

    python pipelines/inbox_job.py --inbox /data/inbox --out /data/refocused
    python pipelines/inbox_job.py --inbox in --out out -- --model deepr-he-20x --workers 2

Arguments after ``--`` go to ``wsi-deepr batch`` (model, tiles, ``--scheduler`` ...).
Exit status: that of the batch (0, 2 when a slide failed on bad input, 1 on an internal
failure); 0 when nothing is new or another run holds the lock. Cron line, systemd units:
``pipelines/systemd/`` and ``docs/cluster.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from pathlib import Path

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide", ".btf",
    ".png", ".jpg", ".jpeg", ".zarr",
)  # fmt: skip
"""What counts as a slide in the inbox (a ``.zarr`` folder is an OME-Zarr store)."""
LOCK_NAME = ".inbox_job.lock"


def new_slides(inbox: Path, out: Path, *, settle_s: float) -> tuple[list[Path], int]:
    """Slides of ``inbox`` without a complete output in ``out``, and how many are done.

    Parameters
    ----------
    inbox : Path
        Folder the slides are dropped into (not searched recursively).
    out : Path
        The batch output folder.
    settle_s : float
        Ignore entries modified less than this many seconds ago.

    Returns
    -------
    (list of Path, int)
        New slides in name order, and the number already done.
    """
    from wsi_deepr.batch_inputs import output_name
    from wsi_deepr.writer import is_complete

    now = time.time()
    fresh, done = [], 0
    for entry in sorted(inbox.iterdir()):
        name = entry.name
        if name.startswith(".") or name.endswith((".part", ".tmp")):
            continue
        if not name.lower().endswith(SLIDE_SUFFIXES):
            continue
        if entry.is_dir() and not name.lower().endswith(".zarr"):
            continue
        if is_complete(out / output_name(entry)):
            done += 1
        elif now - entry.stat().st_mtime >= settle_s:
            fresh.append(entry)
    return fresh, done


def main(argv: list[str] | None = None) -> int:
    """Run the job; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    own, batch_args = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args \
        else (args, [])  # fmt: skip
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inbox", required=True, type=Path, help="folder of new slides")
    parser.add_argument("--out", required=True, type=Path, help="folder of the outputs")
    parser.add_argument("--settle-s", type=float, default=60.0,
                        help="leave files modified this recently (default 60 s)")  # fmt: skip
    parser.add_argument("--lock", type=Path, default=None,
                        help=f"lock file (default OUT/{LOCK_NAME})")  # fmt: skip
    options = parser.parse_args(own)
    inbox, out = options.inbox.absolute(), options.out.absolute()
    if not inbox.is_dir():
        print(f"inbox_job: error: {inbox}: not a folder", file=sys.stderr)
        return 2
    if out == inbox:
        print(f"inbox_job: error: {out}: the outputs (.zarr) would be taken for new slides; "
              "give --out another folder", file=sys.stderr)  # fmt: skip
        return 2
    out.mkdir(parents=True, exist_ok=True)
    lock_path = options.lock or out / LOCK_NAME
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"inbox_job: another run holds {lock_path}; nothing done", file=sys.stderr)
            return 0
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        fresh, done = new_slides(inbox, out, settle_s=options.settle_s)
        if not fresh:
            print(f"inbox_job: nothing new in {inbox} ({done} slides done)", file=sys.stderr)
            return 0
        print(f"inbox_job: {len(fresh)} new slides ({done} done before)", file=sys.stderr)
        from wsi_deepr.cli import main as wsi_deepr

        try:
            wsi_deepr(["batch", *map(str, fresh), "--out", str(out), "--resume", *batch_args])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
