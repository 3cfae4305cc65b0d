"""Command-line interface: a thin layer over the library API.

Each sub-command lives in a module of its own in this package and imports the heavy
libraries (torch, onnxruntime, dask) only when it runs, so ``wsi-deepr --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

import click

from wsi_deepr import __version__
from wsi_deepr.allocator import tune_malloc
from wsi_deepr.errors import InternalError, OptionError, WsiDeeprError

LOG = logging.getLogger("wsi_deepr")
ERROR_PREFIX = "wsi-deepr: error: "
"""Every error the CLI reports is one line starting with this."""


class _Group(click.Group):
    """Resolves sub-commands lazily: ``name -> module wsi_deepr.cli.<module>:<attr>``."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "run": ("run", "run"),
        "batch": ("batch", "batch"),
        "info": ("info", "info"),
        "demo": ("demo", "demo"),
        "train": ("train", "train"),
        "export": ("export", "export"),
        "evaluate": ("evaluate", "evaluate"),
        "pairs": ("pairs", "pairs"),
        "qc": ("qc", "qc"),
        "quantize": ("quantize", "quantize"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            module_name, attr = self.lazy[cmd_name]
            try:
                module = importlib.import_module(f"wsi_deepr.cli.{module_name}")
            except ModuleNotFoundError as exc:
                if exc.name == f"wsi_deepr.cli.{module_name}":
                    return None
                raise
            command: click.Command = getattr(module, attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-deepr")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """wsi-deepr: bring out-of-focus microscopy images back into focus (Deep-R)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="wsi-deepr: %(message)s", stream=sys.stderr)
    LOG.setLevel(level)
    # Libraries' Python warnings (numpy overflow, zarr, dask) are details for --verbose
    # and --debug; on a plain run they would break the one-line error contract.
    logging.captureWarnings(True)
    warnings_level = logging.WARNING if debug or verbose else logging.ERROR
    logging.getLogger("py.warnings").setLevel(warnings_level)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``wsi-deepr`` command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    tune_malloc()  # before any worker thread allocates
    try:
        cli.main(args=args, prog_name="wsi-deepr", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("wsi-deepr: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"{ERROR_PREFIX}{usage_error(exc).one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except WsiDeeprError as exc:
        if debug:
            raise
        click.echo(f"{ERROR_PREFIX}{exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("wsi-deepr: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or a failure of the machine, not the user's input
        if debug:
            raise
        click.echo(f"{ERROR_PREFIX}{internal_error(exc).one_line()}", err=True)
        sys.exit(InternalError.exit_code)


def usage_error(exc: click.UsageError) -> OptionError:
    """A click usage error as one of ours: the option or argument, the problem, a hint.

    Parameters
    ----------
    exc : click.UsageError
        A bad or missing option or argument, an unknown option or command.

    Returns
    -------
    OptionError
        Subject ``--tile-px`` (an option), ``OUTPUT`` (an argument) or the command.
    """
    command = exc.ctx.command_path if exc.ctx is not None else "wsi-deepr"
    subject = command
    problem = exc.format_message().strip().rstrip(".")
    if isinstance(exc, click.BadParameter) and exc.param is not None:
        param = exc.param
        if isinstance(param, click.Option):
            subject = max(param.opts, key=len)
        else:
            subject = param.human_readable_name
        if isinstance(exc, click.MissingParameter):
            problem = f"missing {param.param_type_name}"
        else:
            problem = exc.message.strip().rstrip(".")
    elif isinstance(exc, click.NoSuchOption):
        subject, problem = exc.option_name, "no such option"
        if exc.possibilities:
            problem += f"; did you mean {' or '.join(exc.possibilities[:3])}?"
    elif isinstance(exc, click.BadOptionUsage):
        subject = exc.option_name
    return OptionError(subject, problem, hint=f"see '{command} --help'")


def internal_error(exc: BaseException) -> InternalError:
    """An unexpected exception as one line: what it was, and what to do.

    Parameters
    ----------
    exc : BaseException
        Anything that is not a :class:`WsiDeeprError` (a bug, or the machine failing).

    Returns
    -------
    InternalError
        ``out of memory: ...`` for a :class:`MemoryError`, else ``internal error: ...``.
    """
    lines = str(exc).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    if isinstance(exc, MemoryError):
        return InternalError(
            "out of memory",
            detail or "an allocation failed",
            hint="try a smaller --tile-px or --batch-size, or a machine with more memory",
        )
    return InternalError(
        "internal error",
        f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__,
        hint="a bug in wsi-deepr: rerun with --debug and report the traceback",
    )
