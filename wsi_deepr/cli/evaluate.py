"""``wsi-deepr evaluate``: the paper's evaluation as one command, written as a report folder."""

from __future__ import annotations

import shlex
from pathlib import Path

import click


@click.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME|PATH",
    help="Shipped model name or .onnx path; repeat for several (default: all shipped).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder (index.html, CSV, JSON, PNG).",
)
@click.option(
    "--quick", is_flag=True, help="A small, fast run (smoke tests): 2 fields, every 2 um."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("../shared/data"),
    show_default=True,
    help="Shared data: held-out in-focus images and bead stacks.",
)
@click.option(
    "--zstack",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A real (z, y, x) or (z, c, y, x) TIFF z-stack to evaluate on as well.",
)
@click.option(
    "--zstack-step-um",
    type=click.FloatRange(min=0, min_open=True),
    default=0.2,
    show_default=True,
    help="Axial spacing of --zstack.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="cpu",
    show_default=True,
    help="Where the models run.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="ONNX Runtime threads.",
)
@click.option(
    "--exposure-s",
    type=click.FloatRange(min=0),
    default=0.1,
    show_default=True,
    help="Autofocus benchmark: exposure per captured image.",
)
@click.option(
    "--stage-move-s",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Autofocus benchmark: axial stage move and settle per step (assumed).",
)
@click.option(
    "--fovs",
    type=click.IntRange(min=1),
    default=None,
    help="Held-out fields of view per model (default 20; 2 with --quick).",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pixel size of the simulated captures (default: the middle of each card's range).",
)
@click.option("--overwrite", is_flag=True, help="Replace a report already in --out.")
def evaluate(
    models: tuple[str, ...],
    out: Path,
    quick: bool,
    data_dir: Path,
    zstack: Path | None,
    zstack_step_um: float,
    device: str,
    threads: int,
    exposure_s: float,
    stage_move_s: float,
    fovs: int | None,
    mpp: float | None,
    overwrite: bool,
) -> None:
    """Quality vs defocus, tilt, bead PSF, deconvolution and autofocus baselines of models.

    Prints the SSIM/RMSE-vs-z table of input and output per model; writes everything to
    OUT/index.html, CSV and JSON.
    """
    from wsi_deepr.autofocus import ScanTiming
    from wsi_deepr.errors import InputError, ModelError, OutputError
    from wsi_deepr.evaluation import load_model
    from wsi_deepr.evaluation_suite import SuiteOptions, evaluate_models
    from wsi_deepr.evaluation_summary import table_text, targets, variant_agreement
    from wsi_deepr.model_registry import shipped_cards
    from wsi_deepr.report_html import write_report

    if (out / "index.html").exists() and not overwrite:
        raise OutputError(out, "already holds a report", hint="pass --overwrite to replace it")
    if not data_dir.is_dir():
        raise InputError(data_dir, "no such data folder", hint="pass --data-dir")
    names = list(models) or sorted(shipped_cards())
    if not names:
        raise ModelError("--model", "no model given and none shipped in models/")
    loaded = [load_model(n, device=device, threads=threads) for n in names]
    options = SuiteOptions(
        quick=quick,
        timing=ScanTiming(exposure_s=exposure_s, stage_move_s=stage_move_s),
        n_fovs=fovs,
        mpp=mpp,
    )
    results = evaluate_models(
        loaded, data_dir, options=options, zstack=zstack, zstack_step_um=zstack_step_um
    )
    command = [
        "wsi-deepr",
        "evaluate",
        *[a for n in names for a in ("--model", n)],
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--device",
        device,
        "--threads",
        str(threads),
        "--exposure-s",
        str(exposure_s),
        "--stage-move-s",
        str(stage_move_s),
    ]
    if quick:
        command.append("--quick")
    if fovs is not None:
        command += ["--fovs", str(fovs)]
    if mpp is not None:
        command += ["--mpp", str(mpp)]
    if zstack is not None:
        command += ["--zstack", str(zstack), "--zstack-step-um", str(zstack_step_um)]
    index = write_report(results, out, command=command)
    for model in results["models"]:
        click.echo(table_text(model))
        missed = [t for t in targets(model) if not t["met"]]
        click.echo(f"targets missed: {len(missed)} of {len(targets(model))}")
        for t in missed:
            click.echo(f"  {t['target']} at z = {t['defocus_um']:+g} um: {t['value']:.3f}")
        agreement = variant_agreement(model, results["models"])
        if agreement:
            click.echo(agreement)
        click.echo()
    click.echo(f"report: {index}  ({shlex.join(command)})")
