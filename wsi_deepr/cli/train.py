"""``wsi-deepr train CONFIG``: GAN training of a Deep-R generator."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for checkpoint and history (default: runs/<name>). An existing checkpoint "
    "there is resumed.",
)
@click.option(
    "--max-iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many iterations in this call; resume later with the same command.",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def train(config_path: Path, run_dir: Path | None, max_iterations: int | None, quiet: bool) -> None:
    """Train (or resume) the generator described by the TOML file CONFIG."""
    from wsi_deepr.errors import ConfigError

    try:
        from wsi_deepr.training import TrainConfig
        from wsi_deepr.training import train as run_training
    except ModuleNotFoundError as exc:
        raise ConfigError(
            config_path, f"training needs {exc.name}", hint="pip install 'wsi-deepr[train]'"
        ) from None
    if not config_path.is_file():
        raise ConfigError(config_path, "no such config file")
    config = TrainConfig.from_toml(config_path)
    folder = run_dir or Path("runs") / config.name
    summary = run_training(
        config, run_dir=folder, max_iterations=max_iterations, progress=not quiet
    )
    click.echo(
        f"{config.name}: iteration {summary['iteration']}/{config.iterations}, "
        f"best validation BerHu {summary['best_val']:.4f}, checkpoint {folder / 'checkpoint.pt'}"
    )
