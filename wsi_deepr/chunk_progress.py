"""What an unfinished run has proven written, kept inside its output store.

A run's chunk tasks save here, in a folder of the store, (1) the float spills each chunk
passes to its right, lower and lower-right neighbours, and (2) after a chunk's pixels
are stored (every level written with it), an empty ``done`` marker. A resumed run skips
the chunks with a marker and loads their spills instead of running their tiles again,
so its output is bit for bit that of an uninterrupted run. The folder is removed when
the run completes.

Every file appears whole or not at all (written aside, then renamed).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from wsi_deepr.errors import OutputError

PROGRESS_DIR = "wsi_deepr_progress"
"""Folder of the store that holds the progress of an unfinished run."""

_DONE = re.compile(r"^done-(\d+)-(\d+)$")


class ChunkProgress:
    """Done markers and spills of the chunks of one output store.

    Parameters
    ----------
    store : str or Path
        The output store (folder). Instances pickle as this path, so chunk tasks on
        other processes write to the same place.
    """

    def __init__(self, store: str | Path) -> None:
        self.folder = Path(store) / PROGRESS_DIR

    def __reduce__(self) -> tuple[type[ChunkProgress], tuple[Path]]:
        return (ChunkProgress, (self.folder.parent,))

    def create(self) -> None:
        """Create the folder (no error when it exists)."""
        self.folder.mkdir(parents=True, exist_ok=True)

    def done(self) -> frozenset[tuple[int, int]]:
        """Chunks ``(row, column)`` whose pixels are stored."""
        if not self.folder.is_dir():
            return frozenset()
        found = (_DONE.match(entry.name) for entry in self.folder.iterdir())
        return frozenset((int(m[1]), int(m[2])) for m in found if m)

    def mark_done(self, index: tuple[int, int]) -> None:
        """Record that chunk ``index`` is stored (call after its last write returned)."""
        self._write_atomic(f"done-{index[0]}-{index[1]}", b"")

    def save_spills(self, index: tuple[int, int], spills: tuple[np.ndarray, ...]) -> None:
        """Keep chunk ``index``'s spills (right, below, lower right)."""
        buffer = io.BytesIO()
        right, below, corner = spills
        np.savez(buffer, right=right, below=below, corner=corner)
        self._write_atomic(f"spills-{index[0]}-{index[1]}.npz", buffer.getvalue())

    def load_spills(self, index: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The spills saved for chunk ``index`` (right, below, lower right)."""
        path = self.folder / f"spills-{index[0]}-{index[1]}.npz"
        with np.load(path, allow_pickle=False) as saved:
            return saved["right"], saved["below"], saved["corner"]

    def has_spills(self, index: tuple[int, int]) -> bool:
        """Whether chunk ``index``'s spills were saved."""
        return (self.folder / f"spills-{index[0]}-{index[1]}.npz").is_file()

    def remove(self) -> None:
        """Delete the folder and everything in it."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _write_atomic(self, name: str, content: bytes) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        except OSError as exc:
            raise OutputError.write_failed(self.folder.parent, exc) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, self.folder / name)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise OutputError.write_failed(self.folder.parent, exc) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
