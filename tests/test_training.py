"""A tiny real training run: the validation loss falls, and resume equals no interruption."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wsi_deepr.errors import ConfigError  # noqa: E402
from wsi_deepr.pairs import SimulationSettings, SourceImage, build_bank, split_of  # noqa: E402
from wsi_deepr.training import TrainConfig, adapt_channels, train  # noqa: E402

SHARED_HE = Path(__file__).resolve().parents[2] / "shared" / "data" / "he" / "camelyon16"


def _sources_from_skimage(folder: Path) -> list[SourceImage]:
    """Real IHC tissue (scikit-image's sample), cut into fields of view saved as PNG."""
    from PIL import Image
    from skimage import data

    image = data.immunohistochemistry()  # 512 x 512 RGB, ships with scikit-image
    sources = []
    for i in range(2):
        for j in range(2):
            for k in range(4):  # four names per field: enough to populate train and val
                path = folder / f"ihc_{i}{j}_{k}.png"
                Image.fromarray(image[i * 256 : (i + 1) * 256, j * 256 : (j + 1) * 256]).save(path)
                sources.append(SourceImage(str(path), "skimage/immunohistochemistry"))
    return sources


def _real_sources(tmp_path: Path) -> list[SourceImage]:
    files = sorted(SHARED_HE.glob("*.png"))
    if files:
        return [SourceImage(str(p), "he/camelyon16") for p in files]
    return _sources_from_skimage(tmp_path)


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, SimulationSettings]:
    folder = tmp_path_factory.mktemp("banks")
    sources = _real_sources(folder)
    assert {split_of(s) for s in sources} >= {"train", "val"}
    settings = SimulationSettings("brightfield", (-3.0, 3.0), 0.75, (0.3, 0.5))
    train_bank = build_bank(
        sources,
        settings,
        split="train",
        n_pairs=24,
        crop_px=176,
        seed=0,
        out_path=folder / "train.npz",
    )
    val_bank = build_bank(
        sources,
        settings,
        split="val",
        n_pairs=8,
        crop_px=176,
        seed=1,
        out_path=folder / "val.npz",
    )
    return train_bank, val_bank, settings


def _config(banks: tuple[Path, Path, SimulationSettings], iterations: int) -> TrainConfig:
    train_bank, val_bank, _ = banks
    return TrainConfig(
        name="tiny",
        modality="brightfield",
        seed=3,
        train_bank=str(train_bank),
        val_bank=str(val_bank),
        crop_px=176,
        simulation={"defocus_range_um": [-3.0, 3.0], "na": 0.75, "mpp_range": [0.3, 0.5]},
        widths=(6, 8, 8, 12, 12),
        iterations=iterations,
        batch_size=2,
        lr_g=2e-3,
        val_every=10,
        checkpoint_every=10,
        threads=2,
    )


def test_tiny_training_lowers_validation_loss(banks, tmp_path: Path) -> None:
    config = _config(banks, iterations=40)
    summary = train(config, run_dir=tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert [row["iteration"] for row in history] == [10, 20, 30, 40]
    assert min(row["val_berhu"] for row in history[1:]) < history[0]["val_berhu"]
    assert summary["best_val"] == min(row["val_berhu"] for row in history)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 40
    assert checkpoint["banks"]["train"]["sha256"]
    assert checkpoint["config"]["seed"] == 3


def test_interrupted_and_resumed_run_equals_uninterrupted(banks, tmp_path: Path) -> None:
    config = _config(banks, iterations=12)
    train(config, run_dir=tmp_path / "whole")
    train(config, run_dir=tmp_path / "parts", max_iterations=5)  # "interrupted" after 5
    train(config, run_dir=tmp_path / "parts")
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    for key, value in whole["generator"].items():
        assert torch.equal(value, parts["generator"][key]), key
    for key, value in whole["discriminator"].items():
        assert torch.equal(value, parts["discriminator"][key]), key


def test_resume_refuses_a_different_config(banks, tmp_path: Path) -> None:
    config = _config(banks, iterations=2)
    train(config, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"another config \(differs in lr_g\)"):
        train(replace(config, lr_g=1e-3, iterations=4), run_dir=tmp_path / "run")


def test_raising_iterations_trains_on_from_the_checkpoint(banks, tmp_path: Path) -> None:
    config = _config(banks, iterations=4)
    train(config, run_dir=tmp_path / "run")
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    summary = train(replace(config, iterations=6), run_dir=tmp_path / "run")
    longer = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert summary["iteration"] == longer["iteration"] == 6
    assert longer["config"]["iterations"] == 6
    assert first["history"] == longer["history"][: len(first["history"])]
    changed = [
        k for k, v in first["generator"].items() if not torch.equal(v, longer["generator"][k])
    ]
    assert changed  # trained on, not restarted from scratch or left alone


def test_config_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmodality = "brightfield"\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_toml(bad)
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="cannot read config"):
        TrainConfig.from_toml(bad)


def test_shipped_configs_parse() -> None:
    for path in sorted(
        (Path(__file__).resolve().parents[1] / "pipelines" / "configs").glob("*.toml")
    ):
        config = TrainConfig.from_toml(path)
        settings = config.simulation_settings()
        assert settings.defocus_range_um[0] < 0 < settings.defocus_range_um[1]
        assert np.isfinite(config.lr_g)


def test_rgb_weights_adapted_to_one_channel_compute_the_grey_image() -> None:
    """An RGB generator started as a one-channel one: on a grey image it gives the mean over
    channels of what the RGB network gives on that image repeated in each channel."""
    from wsi_deepr.nets import Discriminator, Generator

    torch.manual_seed(0)
    rgb = Generator(3, (4, 8), global_residual=True)
    grey = Generator(1, (4, 8), global_residual=True)
    grey.load_state_dict(adapt_channels(rgb.state_dict(), grey.state_dict()))
    x = torch.rand(2, 1, 32, 40)
    expected = rgb(x.repeat(1, 3, 1, 1)).mean(dim=1, keepdim=True)
    assert torch.allclose(grey(x), expected, atol=1e-5)

    d_rgb, d_grey = Discriminator(3), Discriminator(1)
    d_grey.load_state_dict(adapt_channels(d_rgb.state_dict(), d_grey.state_dict()))
    assert torch.allclose(d_grey(x), d_rgb(x.repeat(1, 3, 1, 1)), atol=1e-5)

    with pytest.raises(ValueError, match="cannot become"):
        adapt_channels(rgb.state_dict(), Generator(1, (4, 16)).state_dict())
