"""``wsi-deepr quantize MODEL OUT.onnx``: static int8 variant of a model, with its card."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model", metavar="MODEL")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("../shared/data"),
    show_default=True,
    help="Shared data: train-split images for calibration, held-out ones for --check.",
)
@click.option(
    "--tiles", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration tiles."
)
@click.option(
    "--tile-px",
    type=click.IntRange(min=16),
    default=256,
    show_default=True,
    help="Edge of a calibration tile.",
)
@click.option(
    "--format",
    "quant_format",
    type=click.Choice(["QDQ", "QOperator"]),
    default="QDQ",
    show_default=True,
    help="ONNX quantised model format.",
)
@click.option(
    "--method",
    type=click.Choice(["MinMax", "Percentile", "Entropy"]),
    default="MinMax",
    show_default=True,
    help="Activation range calibration.",
)
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor, not per channel.")
@click.option(
    "--full-range",
    is_flag=True,
    help="8-bit weights (default 7-bit: no saturation on CPUs without VNNI).",
)
@click.option(
    "--int8-output", is_flag=True, help="Quantise the last convolution and residual add too."
)
@click.option("--name", default=None, help="Variant name (default: OUT's file stem).")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Measure SSIM against the full model on held-out images (quick "
    "evaluation subset) and record it in the card.",
)
@click.option(
    "--full-check",
    is_flag=True,
    help="Check on the full evaluation set (20 fields, every 1 um) instead of the quick one.",
)
@click.option(
    "--fovs",
    type=click.IntRange(min=1),
    default=None,
    help="Held-out fields of view for the check (default 2, or 20 with --full-check).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="ONNX Runtime threads for --check.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def quantize(
    model: str,
    out: Path,
    data_dir: Path,
    tiles: int,
    tile_px: int,
    quant_format: str,
    method: str,
    per_tensor: bool,
    full_range: bool,
    int8_output: bool,
    name: str | None,
    check: bool,
    full_check: bool,
    fovs: int | None,
    threads: int,
    overwrite: bool,
) -> None:
    """Write OUT (ONNX) and its card OUT.json: MODEL (name or .onnx) quantised to int8.

    Calibrated on defocused tiles of the train split, normalised as `wsi-deepr run`
    does; with --check (default) the SSIM of both models at every evaluation defocus
    is printed and recorded in the card.
    """
    from wsi_deepr.errors import InputError, OutputError
    from wsi_deepr.model_registry import shipped_cards
    from wsi_deepr.quantize import (
        QuantizeSettings,
        compare_with_full,
        quantize_model,
        record_quality,
    )

    if out.suffix != ".onnx":
        raise OutputError(out, "the output must end in .onnx")
    if out.exists() and not overwrite:
        raise OutputError(out, "exists", hint="pass --overwrite to replace it")
    if not data_dir.is_dir():
        raise InputError(data_dir, "no such data folder", hint="pass --data-dir")
    shipped = shipped_cards()
    path = shipped[model][1] if model in shipped else Path(model)
    if not path.is_file():
        raise InputError(path, "no such model file")
    settings = QuantizeSettings(
        quant_format=quant_format,  # type: ignore[arg-type]
        per_channel=not per_tensor,
        reduce_range=not full_range,
        calibration_method=method,  # type: ignore[arg-type]
        n_tiles=tiles,
        tile_px=tile_px,
        float_output=not int8_output,
    )
    card = quantize_model(path, out, data_dir=data_dir, settings=settings, name=name)
    click.echo(
        f"{out}: {card['name']}, int8 variant of {card['variant']['of']} "
        f"({quant_format}), sha256 {card['sha256'][:12]}"
    )
    if not check:
        return
    rows = compare_with_full(
        path, out, data_dir, quick=not full_check, n_fovs=fovs, threads=threads
    )
    subset = "full" if full_check else "quick"
    record_quality(out, rows, how=f"{subset} held-out set ({rows[0]['n']} fields)")
    click.echo("defocus_um  ssim_full  ssim_int8  delta   ssim_int8_vs_full")
    for row in rows:
        click.echo(
            f"{row['defocus_um']:+10.1f}  {row['ssim_full']:9.4f}  "
            f"{row['ssim_variant']:9.4f}  {row['ssim_delta']:+.4f}  "
            f"{row['ssim_variant_vs_full']:.4f}"
        )
    worst = min(row["ssim_delta"] for row in rows)
    click.echo(
        f"worst SSIM change {worst:+.4f} ({subset} held-out set); recorded in "
        f"{out.with_suffix('.json')}"
    )
