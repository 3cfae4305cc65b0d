"""Plain-words summaries of evaluation results: the terminal table and the verdicts.

Works on the JSON-ready per-model results of
:func:`wsi_deepr.evaluation_suite.evaluate_models`:

- :func:`table_text`: SSIM / RMSE of input and output against z, for the terminal;
- :func:`targets`: the quality targets of the model issue (output SSIM >= 0.80 at every z
  in range; at ``|z| >=`` half the range, output SSIM >= input SSIM + 0.15; at z = 0 the
  output no worse than the input by more than 0.02 SSIM), each with its measured value;
- :func:`comparisons`: where Deep-R beats, matches or loses to the input and the
  deconvolution baselines (by mean SSIM, 10-px border cropped), and how its measured speed
  compares with the simulated online autofocus, with the numbers;
- :func:`variant_agreement`: a quantised variant's output SSIM against its full model's at
  every z (the default variant must stay within :data:`VARIANT_SLACK`).
"""

from __future__ import annotations

from typing import Any

SSIM_FLOOR = 0.80
"""Output SSIM wanted at every z within the training range."""
GAIN_FAR = 0.15
"""Output SSIM gain over the input wanted at ``|z| >=`` half the range."""
IN_FOCUS_SLACK = 0.02
"""Largest SSIM loss allowed at z = 0."""
VARIANT_SLACK = 0.01
"""Largest output SSIM difference allowed between a variant and its full model, any z."""
TIE_SSIM = 0.005
"""SSIM differences within this are reported as a match, not a win or a loss."""


def _by_method_z(model: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    return {(r["method"], float(r["defocus_um"])): r for r in model["quality"]}


def table_text(model: dict[str, Any]) -> str:
    """The SSIM / RMSE vs z table of input and output (means over fields), as text."""
    by = _by_method_z(model)
    zs = sorted(z for (m, z) in by if m == "input")
    lines = [
        f"{model['name']}  ({len(model['fields'])} held-out fields, mean over fields)",
        f"{'z_um':>6} {'SSIM in':>8} {'SSIM out':>8} {'RMSE in':>8} {'RMSE out':>8}",
    ]
    for z in zs:
        i, o = by[("input", z)], by[("deepr", z)]
        lines.append(
            f"{z:>+6.1f} {i['ssim_mean']:>8.3f} {o['ssim_mean']:>8.3f} "
            f"{i['rmse_mean']:>8.4f} {o['rmse_mean']:>8.4f}"
        )
    return "\n".join(lines)


def targets(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Each quality target at each z it applies to: measured value and whether it is met.

    Returns
    -------
    list of dict
        ``target``, ``defocus_um``, ``value`` (the quantity compared), ``threshold``,
        ``met``.
    """
    by = _by_method_z(model)
    lo, hi = model["card"].get("defocus_range_um") or (-5.0, 5.0)
    half = max(abs(lo), abs(hi)) / 2.0
    rows = []
    for (method, z), out in sorted(by.items(), key=lambda kv: kv[0][1]):
        if method != "deepr" or not lo <= z <= hi:
            continue
        inp = by[("input", z)]
        rows.append(_row("output SSIM >= 0.80", z, out["ssim_mean"], SSIM_FLOOR))
        if abs(z) >= half:
            gain = out["ssim_mean"] - inp["ssim_mean"]
            rows.append(_row("SSIM gain >= 0.15 at |z| >= range/2", z, gain, GAIN_FAR))
        if z == 0:
            change = out["ssim_mean"] - inp["ssim_mean"]
            rows.append(_row("SSIM change >= -0.02 at z = 0", z, change, -IN_FOCUS_SLACK))
    return rows


def _row(name: str, z: float, value: float, threshold: float) -> dict[str, Any]:
    return {
        "target": name,
        "defocus_um": z,
        "value": float(value),
        "threshold": threshold,
        "met": bool(value >= threshold),
    }


def comparisons(model: dict[str, Any]) -> list[str]:
    """Sentences: Deep-R against input, RL, Landweber (per z) and the online autofocus."""
    by = _by_method_z(model)
    lines = []
    for z in sorted(z for (m, z) in by if m == "deepr_crop10"):
        d = by[("deepr_crop10", z)]
        for method, label in (("input", "the input"), ("rl", "RL"), ("landweber", "Landweber")):
            other = by.get((f"{method}_crop10", z))
            if other is None:
                continue
            diff = d["ssim_mean"] - other["ssim_mean"]
            verdict = "beats" if diff > TIE_SSIM else "matches" if diff >= -TIE_SSIM else "loses to"
            lines.append(
                f"z = {z:+g} um: Deep-R {verdict} {label} (SSIM {d['ssim_mean']:.3f} vs "
                f"{other['ssim_mean']:.3f}, RMSE {d['rmse_mean']:.4f} vs {other['rmse_mean']:.4f})"
            )
    speed = model.get("deepr_speed")
    for row in model.get("autofocus", []):
        if speed is None:
            break
        faster = speed["s_per_mm2"] < row["s_per_mm2_mean"]
        lines.append(
            f"Autofocus {row['criterion']}: {row['images_mean']:.1f} images, "
            f"{row['s_per_mm2_mean']:.1f} s/mm2, focus found in "
            f"{100 * row['found_focus_fraction']:.0f}% of searches; Deep-R "
            f"{speed['s_per_mm2']:.1f} s/mm2 ({speed['provider']}) is "
            f"{'faster' if faster else 'slower'}"
        )
    return lines


def variant_agreement(model: dict[str, Any], models: list[dict[str, Any]]) -> str | None:
    """One sentence comparing a variant's output SSIM with its full model's at every z.

    Parameters
    ----------
    model : dict
        A model's results; a variant's card names its full model (``variant.of``).
    models : list of dict
        All evaluated models, where the full model is looked up by name.

    Returns
    -------
    str or None
        ``None`` for a model that is not a variant, or whose full model was not evaluated.
    """
    of = (model["card"].get("variant") or {}).get("of")
    full = next((m for m in models if m["name"] == of), None)
    if of is None or full is None:
        return None
    mine, theirs = _by_method_z(model), _by_method_z(full)
    deltas = {
        z: mine[("deepr", z)]["ssim_mean"] - theirs[("deepr", z)]["ssim_mean"]
        for (method, z) in mine
        if method == "deepr" and ("deepr", z) in theirs
    }
    if not deltas:
        return None
    worst = max(deltas, key=lambda z: abs(deltas[z]))
    within = all(abs(d) <= VARIANT_SLACK for d in deltas.values())
    return (
        f"{model['name']} against its full model {of}: output SSIM differs by at most "
        f"{deltas[worst]:+.4f} (z = {worst:+g} um) over {len(deltas)} defocus values; "
        f"{'within' if within else 'NOT within'} {VARIANT_SLACK} at every z"
    )
