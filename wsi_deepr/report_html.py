"""The evaluation report folder: ``index.html`` with embedded plots, CSV/JSON of every number.

Written from the JSON-ready results of :func:`wsi_deepr.evaluation_suite.evaluate_models`:

- ``results.json``: everything, with provenance (command, package versions, git commit);
- ``quality.csv`` (every field, z, method), ``quality_summary.csv`` (mean/std over fields),
  ``tilt.csv``, ``autofocus.csv``, ``autofocus_summary.csv``, ``deepr_speed.csv``,
  ``beads.csv``, ``zstack.csv``, ``targets.csv`` (the model issue's quality targets);
- ``fig_*.png`` and ``index.html`` with the same figures embedded (base64), so the page
  is one self-contained file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from wsi_deepr.evaluation_summary import comparisons, targets, variant_agreement

PACKAGES = (
    "wsi-deepr",
    "numpy",
    "scipy",
    "scikit-image",
    "onnxruntime",
    "onnx",
    "matplotlib",
    "dask",
    "tifffile",
)


TARGET_KEYS = ["target", "defocus_um", "value", "threshold", "met"]


def provenance(command: list[str]) -> dict[str, Any]:
    """The exact command, package versions, Python, platform, git commit and time."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        done = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        commit = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "command": command,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys and not isinstance(row[k], list | dict))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _png(fig: Any, path: Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = buffer.getvalue()
    path.write_bytes(data)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{path.stem}">'


def _series(summary: list[dict[str, Any]], method: str, key: str) -> tuple[list[float], ...]:
    rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["defocus_um"])
    return (
        [r["defocus_um"] for r in rows],
        [r[f"{key}_mean"] for r in rows],
        [r[f"{key}_std"] for r in rows],
    )


def _quality_figure(model: dict[str, Any], out: Path, *, key: str = "quality") -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, metric in zip(axes, ("ssim", "ms_ssim", "rmse", "psnr"), strict=True):
        for method, label in (("input", "input"), ("deepr", "Deep-R output")):
            z, mean, std = _series(model[key], method, metric)
            ax.errorbar(z, mean, yerr=std, marker="o", ms=3, capsize=2, label=label)
        ax.set_xlabel("defocus z (um)")
        ax.set_title(metric.upper().replace("_", "-"))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{model['name']}: quality vs defocus (mean +/- std over fields)")
    return _png(fig, out / f"fig_{key}_{model['name']}.png")


def _range_figure(models: list[dict[str, Any]], out: Path, modality: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, model in enumerate(m for m in models if m["card"]["modality"] == modality):
        z, mean, std = _series(model["quality"], "deepr", "ssim")
        lo, hi = model["card"].get("defocus_range_um") or (math.nan, math.nan)
        ax.errorbar(
            z,
            mean,
            yerr=std,
            marker="o",
            ms=3,
            label=f"{model['name']} (trained {lo:g}..{hi:g} um)",
        )
        if i == 0:
            z, mean, std = _series(model["quality"], "input", "ssim")
            ax.errorbar(z, mean, yerr=std, color="grey", ls="--", label="input")
    ax.set_xlabel("defocus z (um)")
    ax.set_ylabel("SSIM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Training range trade-off ({modality})")
    return _png(fig, out / f"fig_range_{modality}.png")


def _tilt_figure(model: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    first = model["tilt"][0]
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = range(len(first["alpha_input"]))
    for kind in ("input", "output"):
        ax.plot(rows, first[f"alpha_{kind}"], label=kind)
    ax.set_xlabel(
        "row (defocus {:.1f} .. {:+.1f} um)".format(
            first["defocus_row_um"][0], first["defocus_row_um"][-1]
        )
    )
    ax.set_ylabel("relative sharpness alpha_i (eq. 6)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{model['name']}: tilted sample {first['tilt_deg']:.2f} deg, {first['fov']}")
    return _png(fig, out / f"fig_tilt_{model['name']}.png")


def _beads_figure(model: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    stacks = model["beads"]
    fig, axes = plt.subplots(1, len(stacks), figsize=(6 * len(stacks), 3.8), squeeze=False)
    for ax, stack in zip(axes[0], stacks, strict=True):
        for kind in ("input", "output"):
            if f"fwhm_{kind}_mean_px" in stack:
                ax.errorbar(
                    stack["z"],
                    stack[f"fwhm_{kind}_mean_px"],
                    yerr=stack[f"fwhm_{kind}_std_px"],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=kind,
                )
        ax.set_xlabel(f"z ({stack['z_unit']})")
        ax.set_ylabel("lateral FWHM (px)")
        ax.set_title(f"{stack['stack']}: {stack['beads_kept']} beads")
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig, out / f"fig_beads_{model['name']}.png")


def _deconvolution_figure(model: dict[str, Any], out: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, metric in zip(axes, ("ssim", "rmse"), strict=True):
        for method in ("input", "deepr", "rl", "landweber"):
            z, mean, std = _series(model["quality"], f"{method}_crop10", metric)
            if z:
                ax.errorbar(z, mean, yerr=std, marker="o", ms=4, capsize=2, label=method)
        ax.set_xlabel("defocus z (um)")
        ax.set_title(f"{metric.upper()} (10 px border cropped)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig, out / f"fig_deconvolution_{model['name']}.png")


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_HEAD = (
    "<!doctype html><html><head><meta charset='utf-8'><title>wsi-deepr evaluation</title>"
    "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
    "</style></head><body><h1>wsi-deepr evaluation</h1>"
)


def _provenance_html(prov: dict[str, Any]) -> str:
    return (
        f"<p><b>Command:</b> <code>{html.escape(' '.join(prov['command']))}</code><br>"
        f"<b>Versions:</b> {html.escape(json.dumps(prov['versions']))}<br>"
        f"<b>Python</b> {prov['python']} on {html.escape(prov['platform'])}; "
        f"git {prov['git_commit']}; {prov['utc']}</p>"
        "<p>Every number is also in <code>results.json</code> and the CSV files beside "
        "this page.</p>"
    )


def _model_header(m: dict[str, Any]) -> str:
    s, card = m["settings"], m["card"]
    jpeg = f", JPEG q{s['jpeg_quality']}" if s["modality"] == "brightfield" else ""
    return (
        f"<h2>{html.escape(m['name'])}</h2><p>{html.escape(m['path'])} "
        f"(sha256 {m['sha256'][:12]}), {card['modality']}, trained "
        f"{card.get('defocus_range_um')} um. Simulated inputs: NA {s['na']}, {s['mpp']} um/px, "
        f"{s['crop_px']} px fields, {len(m['fields'])} held-out fields, "
        f"{s['photons_at_one']:g} photo-electrons at 1, read noise {s['read_noise_e']} e-{jpeg}; "
        f"run took {m['seconds']:.0f} s.</p>"
    )


def _speed_html(sp: dict[str, Any], settings: dict[str, Any]) -> str:
    cpu = sp.get("cpu_seconds")
    extra = (
        f"; {cpu:.3g} CPU-s on {sp['threads']} threads, load average {sp['load_average_1min']:.1f}"
        if cpu is not None
        else ""
    )
    return (
        f"<p>Deep-R: <b>{sp['s_per_mm2']:.3g} s/mm<sup>2</sup></b> measured ({sp['seconds']:.3g} s "
        f"wall for {sp['edge_px']}x{sp['edge_px']} px at {sp['mpp']} um/px, {sp['provider']}"
        f"{extra}). The online autofocus figures use the stated exposure and stage-move times "
        "per image plus the measured criterion cost scaled to a 2048x2048 camera field at "
        f"{settings['mpp']} um/px; the final in-focus capture is excluded, as in the paper.</p>"
    )


def write_report(results: dict[str, Any], out: Path, *, command: list[str]) -> Path:
    """Write the report folder and return the path of ``index.html``.

    Parameters
    ----------
    results : dict
        From :func:`wsi_deepr.evaluation_suite.evaluate_models`.
    out : Path
        Folder (created; existing files of the same names are replaced).
    command : list of str
        The command line that produced the results.
    """
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results, provenance=provenance(command))
    models = results["models"]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    flat: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            "quality",
            "quality_summary",
            "tilt",
            "autofocus",
            "autofocus_summary",
            "deepr_speed",
            "beads",
            "zstack",
            "targets",
        )
    }
    for m in models:
        tag = {"model": m["name"]}
        flat["quality"] += [tag | r for r in m["quality_rows"]]
        flat["quality_summary"] += [tag | r for r in m["quality"]]
        flat["tilt"] += [tag | r for r in m["tilt"]]
        flat["autofocus"] += [tag | r for r in m["autofocus_rows"]]
        flat["autofocus_summary"] += [tag | r for r in m["autofocus"]]
        flat["deepr_speed"] += [tag | m["deepr_speed"]]
        for s in m["beads"]:
            for i, z in enumerate(s["z"]):
                row = tag | {
                    "stack": s["stack"],
                    "z": z,
                    "z_unit": s["z_unit"],
                    "beads_kept": s["beads_kept"],
                }
                for key in s:
                    if key.startswith("fwhm_"):
                        row[key] = s[key][i]
                flat["beads"].append(row)
        if "zstack" in m:
            flat["zstack"] += [tag | r for r in m["zstack"]["quality"]]
        flat["targets"] += [tag | r for r in targets(m)]
    for name, rows in flat.items():
        _write_csv(out / f"{name}.csv", rows)

    parts = [_HEAD, _provenance_html(results["provenance"])]
    for m in models:
        parts.append(_model_header(m))
        parts.append("<h3>Verdict</h3>" + _table(targets(m), TARGET_KEYS))
        agreement = variant_agreement(m, models)
        sentences = ([agreement] if agreement else []) + comparisons(m)
        parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in sentences) + "</ul>")
        parts.append("<h3>1. Quality vs defocus (Fig. 2b, 8)</h3>" + _quality_figure(m, out))
        keys = [
            "method",
            "defocus_um",
            "n",
            "ssim_mean",
            "ssim_std",
            "ms_ssim_mean",
            "rmse_mean",
            "psnr_mean",
        ]
        parts.append(_table([r for r in m["quality"] if r["method"] in ("input", "deepr")], keys))
        parts.append(
            "<h3>5. Deconvolution baselines (Fig. 6)</h3><p>Richardson-Lucy 100 iterations, "
            "Landweber 100 iterations step 0.1, both given the true PSF; Deep-R gets none.</p>"
        )
        if m["deconvolution_z_um"]:
            parts.append(_deconvolution_figure(m, out))
            parts.append(_table([r for r in m["quality"] if r["method"].endswith("_crop10")], keys))
        else:
            parts.append("<p>Not repeated for a quantised variant: see its full model.</p>")
        parts.append("<h3>3. Tilted sample (Fig. 4, eqs. 5-7)</h3>" + _tilt_figure(m, out))
        parts.append(
            _table(
                m["tilt"],
                [
                    "fov",
                    "center_defocus_um",
                    "tilt_deg",
                    "span_um",
                    "alpha_input_mean",
                    "alpha_output_mean",
                    "std_input_mean",
                    "std_output_mean",
                    "ssim_input",
                    "ssim_output",
                ],
            )
        )
        if m["beads"]:
            parts.append("<h3>4. Bead PSF (Fig. 5b): lateral FWHM vs z on real bead stacks</h3>")
            parts.append(_beads_figure(m, out))
        sp = m["deepr_speed"]
        parts.append("<h3>6. Online autofocus (Table 1) vs Deep-R</h3>")
        parts.append("<p>Simulated stacks of the held-out fields (true focus known):</p>")
        parts.append(_table(m["autofocus"], list(m["autofocus"][0]) if m["autofocus"] else []))
        if m.get("autofocus_real"):
            parts.append(
                "<p>Real bead z-stack (bian, 0.125 um planes; focus = sharpest plane):</p>"
            )
            parts.append(_table(m["autofocus_real"], list(m["autofocus_real"][0])))
        parts.append(_speed_html(sp, m["settings"]))
        if "zstack" in m:
            parts.append(
                "<h3>Real z-stack</h3>"
                + _quality_figure(m["zstack"] | {"name": m["name"] + "-zstack"}, out)
            )
            parts.append(_table(m["zstack"]["quality"], keys))
    modalities = sorted({m["card"]["modality"] for m in models})
    parts.append("<h2>2. Training range trade-off (Fig. 8)</h2>")
    for modality in modalities:
        parts.append(_range_figure(models, out, modality))
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index
