"""Deep-R losses against independent implementations and the paper's equations."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytorch_msssim = pytest.importorskip("pytorch_msssim")

from wsi_deepr.losses import berhu, discriminator_loss, generator_adversarial, ms_ssim  # noqa: E402


def _real_pair() -> tuple[np.ndarray, np.ndarray]:
    from pathlib import Path

    from wsi_deepr.pairs import SourceImage, load_in_focus
    from wsi_deepr.physics import brightfield_optics, defocus_image

    path = Path(__file__).resolve().parents[2] / "shared/data/he/camelyon16"
    files = sorted(path.glob("*.png"))
    if not files:
        pytest.skip("../shared/data/he/camelyon16 is absent")
    target = load_in_focus(SourceImage(str(files[0]), "he/camelyon16"), "brightfield")
    blurred = defocus_image(target, 2.0, optics=brightfield_optics(0.75, 0.3))
    return blurred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ms_ssim_matches_pytorch_msssim_on_random_images(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 256, 256, generator=gen)
    y = (x + 0.3 * torch.rand(2, 3, 256, 256, generator=gen)).clamp(0, 1)
    ours = ms_ssim(x, y, 1.0)
    reference = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    assert torch.allclose(ours, reference, atol=1e-3)


def test_ms_ssim_matches_pytorch_msssim_on_real_images() -> None:
    blurred, target = _real_pair()
    x = torch.from_numpy(blurred[None]).clamp(0, 1)
    y = torch.from_numpy(target[None])
    ours = ms_ssim(x, y, 1.0)
    reference = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    assert float(ours) == pytest.approx(float(reference), abs=1e-3)
    assert 0.3 < float(ours) < 0.99


def test_ms_ssim_is_one_for_identical_images_and_rejects_small_ones() -> None:
    x = torch.rand(1, 1, 192, 192)
    assert float(ms_ssim(x, x, 1.0)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="176"):
        ms_ssim(torch.rand(1, 1, 100, 100), torch.rand(1, 1, 100, 100), 1.0)


def test_berhu_matches_equation_4_by_hand() -> None:
    rng = np.random.default_rng(3)
    target = rng.standard_normal((2, 1, 16, 16))
    prediction = target + rng.standard_normal((2, 1, 16, 16)) * 0.3
    for i in range(2):
        c = 0.1 * target[i].std(ddof=1)
        expected = 0.0
        for d in np.abs(prediction[i] - target[i]).ravel():
            expected += d if d <= c else (d * d + c * c) / (2 * c)
        got = berhu(torch.from_numpy(prediction), torch.from_numpy(target), reduction="sum")[i]
        assert float(got) == pytest.approx(expected, rel=1e-9)
    mean = berhu(torch.from_numpy(prediction), torch.from_numpy(target))
    total = berhu(torch.from_numpy(prediction), torch.from_numpy(target), reduction="sum")
    assert torch.allclose(mean * 256, total)


def test_least_squares_adversarial_terms() -> None:
    d_fake = torch.tensor([0.0, 0.25, 1.0])
    d_real = torch.tensor([1.0, 0.5, 0.0])
    assert torch.allclose(generator_adversarial(d_fake), torch.tensor([1.0, 0.5625, 0.0]))
    assert torch.allclose(discriminator_loss(d_fake, d_real), torch.tensor([0.0, 0.3125, 2.0]))
