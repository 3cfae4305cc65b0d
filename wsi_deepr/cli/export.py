"""``wsi-deepr export CHECKPOINT OUT.onnx``: ONNX export with a model card."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name (default: OUT's file stem).")
@click.option("--last", is_flag=True, help="Export the last weights, not the best validated.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def export(checkpoint: Path, out: Path, name: str | None, last: bool, overwrite: bool) -> None:
    """Export the generator of CHECKPOINT to OUT (ONNX) and OUT's model card (.json)."""
    from wsi_deepr.errors import OutputError
    from wsi_deepr.export import (
        export_onnx,
        generator_from_checkpoint,
        load_checkpoint,
        onnx_parity,
    )

    if out.suffix != ".onnx":
        raise OutputError(out, "the output must end in .onnx")
    if out.exists() and not overwrite:
        raise OutputError(out, "exists", hint="pass --overwrite to replace it")
    card = export_onnx(checkpoint, out, name=name, best=not last)
    generator = generator_from_checkpoint(load_checkpoint(checkpoint), best=not last)
    diff = onnx_parity(generator, out, (1, int(card["in_channels"]), 300, 421))
    click.echo(
        f"{out}: {card['name']} ({card['modality']}, {card['in_channels']} channel(s), "
        f"defocus {card['defocus_range_um']} um), sha256 {card['sha256'][:12]}, "
        f"ONNX vs torch max |diff| {diff:.2e} on 1x{card['in_channels']}x300x421"
    )
