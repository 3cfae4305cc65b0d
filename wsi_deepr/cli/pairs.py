"""``wsi-deepr pairs zstack STACK... --out DIR``: training pairs from real z-stacks."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def pairs() -> None:
    """Prepare training pair banks."""


@pairs.command()
@click.argument("stacks", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for train.npz, val.npz, splits.json and zstack_report.json.",
)
@click.option(
    "--z-step-um",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Axial spacing of the planes (required for stacks whose metadata lacks it; "
    "overrides the metadata).",
)
@click.option("--crop-px", type=click.IntRange(min=16), default=256, show_default=True)
@click.option(
    "--max-defocus-um",
    type=click.FloatRange(min=0),
    default=None,
    help="Keep pairs with |z| up to this (the training range); all planes by default.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=0.15,
    show_default=True,
    help="Share of fields of view (whole stacks) for validation.",
)
def zstack(
    stacks: tuple[Path, ...],
    out_dir: Path,
    z_step_um: float | None,
    crop_px: int,
    max_defocus_um: float | None,
    val_fraction: float,
) -> None:
    """Register each z-stack STACK (one TIFF per field of view), build its EDOF reference,
    take the plane closest to it (SSIM) per crop as ground truth, and write pair banks
    that ``wsi-deepr train`` reads (set train_bank / val_bank in the config)."""
    from wsi_deepr.errors import InputError
    from wsi_deepr.zstack import build_zstack_banks

    for path in stacks:
        if not path.is_file():
            raise InputError(path, "no such file")
    banks = build_zstack_banks(
        list(stacks),
        out_dir,
        crop_px=crop_px,
        z_step_um=z_step_um,
        max_defocus_um=max_defocus_um,
        val_fraction=val_fraction,
    )
    click.echo(
        f"{banks.train}: {banks.counts['train']} pairs; {banks.val}: {banks.counts['val']} "
        f"pairs; split {banks.manifest}; shifts and ground truth {banks.report}"
    )
