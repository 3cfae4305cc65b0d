"""User-facing errors.

Every failure a user can cause is one of these types. Each carries the file (or option) it
concerns and the problem in words, so the CLI can print one line
``wsi-deepr: error: <file>: <problem>`` and exit with :attr:`WsiDeeprError.exit_code`
without a traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path


class WsiDeeprError(Exception):
    """Base class of all errors wsi-deepr reports to a user.

    Parameters
    ----------
    subject : str or Path
        The file, store or option the problem concerns.
    problem : str
        What is wrong, in words a user understands.
    hint : str, optional
        What the user can do about it.
    """

    exit_code: int = 2

    def __init__(self, subject: str | Path, problem: str, *, hint: str | None = None) -> None:
        self.subject = str(subject)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.subject}: {problem}")

    def __reduce__(self) -> tuple[object, ...]:
        # Errors raised in dask.distributed workers travel back pickled; the default
        # reduction would call __init__ with the message alone.
        return (_rebuild, (type(self), self.subject, self.problem, self.hint))

    def one_line(self) -> str:
        """The message the CLI prints, hint included."""
        line = f"{self.subject}: {self.problem}"
        if self.hint:
            line += f" ({self.hint})"
        return line


class InputError(WsiDeeprError):
    """An input file (slide, image, store) cannot be read or makes no sense."""


class UnsupportedFormatError(InputError):
    """No reader recognises the file."""


class MetadataError(InputError):
    """The file's metadata (pixel size, channels, levels) is missing or absurd."""


class ModelError(WsiDeeprError):
    """A model cannot be found, loaded or does not fit the input."""


class OutputError(WsiDeeprError):
    """An output cannot be written where asked (exists, not writable, disk full)."""

    @classmethod
    def write_failed(cls, out: str | Path, exc: OSError) -> OutputError:
        """The error for a failed write into the store ``out`` (disk full named as such)."""
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return cls(out, f"write failed, disk full ({reason}); the store is incomplete")
        return cls(out, f"write failed ({reason}); the store is incomplete")


class OptionError(WsiDeeprError):
    """Options that are invalid on their own or contradict each other."""


class ConfigError(WsiDeeprError):
    """A configuration file (training, batch manifest) is invalid."""


class InternalError(WsiDeeprError):
    """A failure that is wsi-deepr's fault, not the user's."""

    exit_code = 1


def _rebuild(
    cls: type[WsiDeeprError], subject: str, problem: str, hint: str | None
) -> WsiDeeprError:
    """Recreate an error from its parts (unpickling)."""
    return cls(subject, problem, hint=hint)
