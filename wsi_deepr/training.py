"""GAN training of the Deep-R generator, as in the paper's Methods.

Per iteration: ``d_steps`` discriminator updates with eq. (2), then ``g_steps`` generator
updates with eq. (1) (least-squares adversarial + MS-SSIM + BerHu). Adam with the paper's
learning rates (5e-4 generator, 1e-6 discriminator) by default, optionally cosine-decayed.
Inputs and targets are normalised per pair with the input's mean and standard deviation
(per channel), the same transform the pipeline applies with slide-level statistics, so a
model's output is de-normalised the same way at inference. Training pairs get the 8
flips/rotations at random; validation pairs are not augmented. The generator with the
lowest validation BerHu is kept.

Everything that defines a run (config, seed, banks with their sha256, versions) and its
state (weights, optimisers, random generator, history) is in one checkpoint, written
atomically, so an interrupted run resumes to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_deepr import __version__
from wsi_deepr.errors import ConfigError
from wsi_deepr.losses import berhu, discriminator_loss, generator_adversarial, ms_ssim
from wsi_deepr.nets import Discriminator, Generator
from wsi_deepr.pairs import PairBank, SimulationSettings, build_bank, list_sources

LOG = logging.getLogger("wsi_deepr")


@dataclass(frozen=True)
class TrainConfig:
    """A training run, as read from a TOML file under ``pipelines/configs``."""

    name: str
    modality: str
    seed: int = 0
    data_dir: str = "../shared/data"
    train_bank: str = ""
    val_bank: str = ""
    train_pairs: int = 3000
    val_pairs: int = 160
    crop_px: int = 192
    simulation: dict[str, Any] = field(default_factory=dict)
    widths: tuple[int, ...] = (16, 24, 32, 48, 64)
    global_residual: bool = True
    iterations: int = 2000
    batch_size: int = 6
    g_steps: int = 1
    d_steps: int = 1
    lr_g: float = 5e-4
    lr_d: float = 1e-6
    lr_decay: str = "cosine"
    weight_adversarial: float = 0.05
    weight_msssim: float = 1.0
    weight_berhu: float = 1.0
    val_every: int = 50
    checkpoint_every: int = 50
    threads: int = 2
    grad_clip_norm: float = 0.0
    """Clip the generator's and discriminator's gradients to this global L2 norm (0: off)."""
    init_from: str = ""
    """Checkpoint whose best generator (and discriminator) start this run (fine-tuning).

    It may have another channel count (an RGB model starting a one-channel one): see
    :func:`adapt_channels`."""

    @classmethod
    def from_toml(cls, path: Path) -> TrainConfig:
        """Read and check a config file.

        Parameters
        ----------
        path : Path
            TOML file with the keys of this class at the top level.

        Returns
        -------
        TrainConfig
        """
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(path, f"cannot read config: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(path, f"unknown keys {sorted(unknown)}")
        if "widths" in raw:
            raw["widths"] = tuple(raw["widths"])
        try:
            config = cls(**raw)
        except TypeError as exc:
            raise ConfigError(path, str(exc)) from None
        config.simulation_settings()  # validates the simulation block
        return config

    def simulation_settings(self) -> SimulationSettings:
        """The simulation parameters of the pair banks."""
        try:
            return SimulationSettings.from_dict(self.modality, self.simulation)
        except TypeError as exc:
            raise ConfigError(self.name, f"simulation block: {exc}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_banks(config: TrainConfig, root: Path) -> tuple[Path, Path]:
    """Build the train and validation banks when missing; return their paths."""
    settings = config.simulation_settings()
    paths = []
    for split, rel, n, seed in (
        ("train", config.train_bank, config.train_pairs, config.seed),
        ("val", config.val_bank, config.val_pairs, config.seed + 1),
    ):
        path = (root / rel) if rel else (root / "runs" / "banks" / f"{config.name}-{split}.npz")
        if not path.exists():
            LOG.info("building %s bank %s (%d pairs)", split, path, n)
            sources = list_sources((root / config.data_dir).resolve(), config.modality)
            build_bank(
                sources,
                settings,
                split=split,  # type: ignore[arg-type]
                n_pairs=n,
                crop_px=config.crop_px,
                seed=seed,
                out_path=path,
            )
        paths.append(path)
    return paths[0], paths[1]


def normalise_pair(
    x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per image and channel, with the input's statistics.

    Returns the normalised input and target, and the mean and std used.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    return (x - mean) / std, (y - mean) / std, mean, std


def adapt_channels(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Weights of a network with C channels reshaped for the same network with one channel.

    A one-channel image given to an RGB network is the same image in every channel, so
    weights that read the image are summed over the input channels, and weights that write
    it are averaged over the output channels: the adapted network computes on a grey image
    what the original computes on that image repeated in each channel, then averaged.

    Parameters
    ----------
    state : dict
        State dict of the source network.
    target : dict
        State dict of the network to start (gives the shapes wanted).

    Returns
    -------
    dict
        ``state`` with the mismatched tensors adapted.

    Raises
    ------
    ValueError
        If a tensor differs in a way channel adaptation does not explain.
    """
    adapted = {}
    for key, value in state.items():
        want = target[key].shape
        if value.shape == want:
            adapted[key] = value
        elif value.ndim > 1 and want[1] == 1 and value.shape[0] == want[0]:
            adapted[key] = value.sum(dim=1, keepdim=True)
        elif want[0] == 1 and value.shape[1:] == want[1:]:
            adapted[key] = value.mean(dim=0, keepdim=True)
        else:
            raise ValueError(f"{key}: {tuple(value.shape)} cannot become {tuple(want)}")
    return adapted


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One of the 8 flips/rotations per batch element."""
    codes = torch.randint(0, 8, (x.shape[0],), generator=gen)
    xs, ys = [], []
    for i, code in enumerate(codes.tolist()):
        a, b = x[i], y[i]
        if code & 4:
            a, b = a.flip(-1), b.flip(-1)
        a, b = torch.rot90(a, code & 3, dims=(-2, -1)), torch.rot90(b, code & 3, dims=(-2, -1))
        xs.append(a)
        ys.append(b)
    return torch.stack(xs), torch.stack(ys)


def generator_loss_terms(
    generator: Generator,
    discriminator: Discriminator,
    x_n: torch.Tensor,
    y_n: torch.Tensor,
    *,
    output: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The three terms of eq. (1), each averaged over the batch.

    ``output`` is the generator's output on ``x_n`` when already computed.
    """
    out = generator(x_n) if output is None else output
    max_val = (y_n.flatten(1).amax(1) - y_n.flatten(1).amin(1)).clamp(min=1e-3)
    return {
        "adversarial": generator_adversarial(discriminator(out)).mean(),
        "msssim": (1.0 - ms_ssim(out, y_n, max_val)).mean(),
        "berhu": berhu(out, y_n).mean(),
        "output": out,
    }


def _lr_factor(config: TrainConfig, iteration: int) -> float:
    if config.lr_decay == "cosine":
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * iteration / max(config.iterations, 1)))
    return 1.0


def validate(generator: Generator, bank: PairBank, batch_size: int = 16) -> dict[str, float]:
    """Mean BerHu, MS-SSIM and L1 of the generator on a (not augmented) bank."""
    generator.eval()
    totals = {"berhu": 0.0, "msssim": 0.0, "l1": 0.0}
    with torch.no_grad():
        for start in range(0, len(bank), batch_size):
            x = torch.from_numpy(bank.inputs[start : start + batch_size])
            y = torch.from_numpy(bank.targets[start : start + batch_size])
            x_n, y_n, _, _ = normalise_pair(x, y)
            out = generator(x_n)
            max_val = (y_n.flatten(1).amax(1) - y_n.flatten(1).amin(1)).clamp(min=1e-3)
            totals["berhu"] += float(berhu(out, y_n).sum())
            totals["msssim"] += float(ms_ssim(out, y_n, max_val).sum())
            totals["l1"] += float((out - y_n).abs().mean(dim=(1, 2, 3)).sum())
    generator.train()
    return {k: v / len(bank) for k, v in totals.items()}


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    config: TrainConfig,
    *,
    run_dir: Path,
    root: Path = Path("."),
    max_iterations: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the final checkpoint's summary.

    Parameters
    ----------
    config : TrainConfig
        The run's settings.
    run_dir : Path
        Folder of the run: ``checkpoint.pt`` and ``history.jsonl`` live there. An existing
        checkpoint is resumed (its config must equal ``config``).
    root : Path
        Folder that relative paths in the config are resolved against.
    max_iterations : int, optional
        Stop after this many iterations in this call (the run can be resumed later).
    progress : bool
        Log a line per validation.

    Returns
    -------
    dict
        ``iteration``, ``best_val`` and the last validation figures.
    """
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = ensure_banks(config, root)
    train_bank, val_bank = PairBank.load(train_path), PairBank.load(val_path)
    channels = train_bank.inputs.shape[1]

    torch.manual_seed(config.seed)
    generator = Generator(channels, config.widths, config.global_residual)
    discriminator = Discriminator(channels)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d)
    gen = torch.Generator().manual_seed(config.seed)
    state: dict[str, Any] = {
        "iteration": 0,
        "best_val": math.inf,
        "best_generator": None,
        "history": [],
    }
    ckpt_path = run_dir / "checkpoint.pt"
    if config.init_from and not ckpt_path.exists():
        start = torch.load(root / config.init_from, weights_only=True)
        generator.load_state_dict(
            adapt_channels(start.get("best_generator") or start["generator"],
                           generator.state_dict())
        )  # fmt: skip
        discriminator.load_state_dict(
            adapt_channels(start["discriminator"], discriminator.state_dict())
        )
        LOG.info("initialised %s from %s", config.name, config.init_from)
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=True)
        current = asdict(config) | {"widths": list(config.widths)}
        # Settings added since the checkpoint was made count as their defaults (which
        # reproduce the code it was made with).
        before = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
        saved_config = before | saved["config"]
        # Only `iterations` may change: raising it trains on (the cosine schedule is
        # stretched to the new length); anything else would not be the same run.
        if {**saved_config, "iterations": config.iterations} != current:
            changed = sorted(
                k for k in current.keys() | saved_config.keys()
                if k != "iterations" and saved_config.get(k) != current.get(k)
            )  # fmt: skip
            raise ConfigError(
                ckpt_path,
                f"checkpoint was made with another config (differs in {', '.join(changed)})",
                hint="only `iterations` may change when resuming",
            )
        if saved["config"]["iterations"] != config.iterations:
            LOG.info("%s: iterations %d -> %d", config.name, saved["config"]["iterations"],
                     config.iterations)  # fmt: skip
        generator.load_state_dict(saved["generator"])
        discriminator.load_state_dict(saved["discriminator"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        gen.set_state(saved["rng"])
        for key in ("iteration", "best_val", "best_generator", "history"):
            state[key] = saved[key]
        LOG.info("resumed %s at iteration %d", config.name, state["iteration"])

    def checkpoint() -> None:
        _save_atomic(
            {
                "config": asdict(config) | {"widths": list(config.widths)},
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "rng": gen.get_state(),
                "banks": {"train": _bank_id(train_path), "val": _bank_id(val_path)},
                "versions": {
                    "wsi_deepr": __version__,
                    "torch": str(torch.__version__),
                    "numpy": np.__version__,
                },
                "channels": channels,
                **state,
            },
            ckpt_path,
        )

    stop_at = config.iterations
    if max_iterations is not None:
        stop_at = min(stop_at, state["iteration"] + max_iterations)
    t0 = time.monotonic()
    start_iteration = state["iteration"]
    while state["iteration"] < stop_at:
        it = state["iteration"]
        for opt, base in ((opt_g, config.lr_g), (opt_d, config.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * _lr_factor(config, it)
        idx = torch.randint(0, len(train_bank), (config.batch_size,), generator=gen)
        x = torch.from_numpy(train_bank.inputs[idx.numpy()])
        y = torch.from_numpy(train_bank.targets[idx.numpy()])
        x, y = _augment(x, y, gen)
        x_n, y_n, _, _ = normalise_pair(x, y)
        # One generator forward serves the discriminator updates (detached) and the
        # first generator update; further generator updates run their own forward.
        output = generator(x_n)
        for _ in range(config.d_steps):
            loss_d = discriminator_loss(discriminator(output.detach()), discriminator(y_n)).mean()
            opt_d.zero_grad()
            loss_d.backward()
            if config.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(discriminator.parameters(), config.grad_clip_norm)
            opt_d.step()
        for step in range(config.g_steps):
            terms = generator_loss_terms(
                generator, discriminator, x_n, y_n, output=output if step == 0 else None
            )
            loss_g = (
                config.weight_adversarial * terms["adversarial"]
                + config.weight_msssim * terms["msssim"]
                + config.weight_berhu * terms["berhu"]
            )
            opt_g.zero_grad()
            loss_g.backward()
            if config.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(generator.parameters(), config.grad_clip_norm)
            opt_g.step()
        state["iteration"] = it + 1
        done = state["iteration"]
        if done % config.val_every == 0 or done == config.iterations:
            val = validate(generator, val_bank)
            row = {
                "iteration": done,
                "loss_g": float(loss_g.detach()),
                "loss_d": float(loss_d.detach()),
                **{f"train_{k}": float(v.detach()) for k, v in terms.items() if k != "output"},
                **{f"val_{k}": v for k, v in val.items()},
                "seconds": time.monotonic() - t0,
            }
            state["history"].append(row)
            with (run_dir / "history.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if val["berhu"] < state["best_val"]:
                state["best_val"] = val["berhu"]
                state["best_generator"] = {
                    k: v.detach().clone() for k, v in generator.state_dict().items()
                }
            if progress:
                LOG.warning(
                    "%s it %d/%d  G %.4f  D %.4f  val BerHu %.4f  MS-SSIM %.4f  (%.2f it/s)",
                    config.name,
                    done,
                    config.iterations,
                    row["loss_g"],
                    row["loss_d"],
                    val["berhu"],
                    val["msssim"],
                    (done - start_iteration) / max(row["seconds"], 1e-9),
                )
        if done % config.checkpoint_every == 0 or done == stop_at:
            checkpoint()
    return {
        "iteration": state["iteration"],
        "best_val": state["best_val"],
        "last": state["history"][-1] if state["history"] else {},
    }


def _bank_id(path: Path) -> dict[str, str]:
    return {"path": str(path), "sha256": _sha256(path)}
