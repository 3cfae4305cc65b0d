"""Z-stack pairs: registration, EDOF ground truth, crops, FOV split, bank, training.

The stacks are made with the defocus physics from a real in-focus fluorescence image
(shared data, or scikit-image's real IHC sample where that is absent), with a known focus
plane, known sub-pixel drift per plane and Poisson-Gaussian noise. The real bead stack
checks the ground-truth plane against the bead's brightest plane.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from wsi_deepr import physics, zstack
from wsi_deepr.errors import ConfigError, InputError, MetadataError
from wsi_deepr.pairs import PairBank, SourceImage, load_in_focus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLUO = SHARED / "fluo" / "stardist_img2d.tif"
BEADS = SHARED / "beads" / "bian_bead_image1_crop.tif"

Z_UM = np.arange(-2.0, 3.01, 0.5)
"""Heights of the planes around the true focus (index 4: off-centre on purpose)."""
TRUE_INDEX = 4
OPTICS = (physics.Optics(0.75, 0.55, 0.25),)
"""No spherical aberration: with it, the plane of best contrast moves off z = 0 by up to
half the depth of field (here one 0.5 um step), and the "true" plane is not defined."""
BORDER_PX = 16


def _in_focus() -> np.ndarray:
    """A real in-focus fluorescence image (1, 512, 512) in [0, 1]."""
    if FLUO.exists():
        return load_in_focus(SourceImage(str(FLUO), "fluo/stardist_img2d"), "fluorescence")
    from skimage import data

    grey = data.immunohistochemistry().mean(axis=-1) / 255.0
    return (1.0 - grey)[None].astype(np.float32)  # stain as signal


def _make_stack(
    image: np.ndarray, rng: np.random.Generator, *, max_shift_px: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Defocused planes at ``Z_UM`` with drift ``(Z, 2)`` (content moved by it) and noise."""
    drift = rng.uniform(-max_shift_px, max_shift_px, size=(len(Z_UM), 2))
    planes = []
    for z_um, d in zip(Z_UM, drift, strict=True):
        blurred = physics.defocus_image(image, float(z_um), optics=OPTICS)[0]
        moved = np.fft.ifft2(ndi.fourier_shift(np.fft.fft2(blurred), d)).real
        moved = moved[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX]  # no wrapped edge
        noisy = physics.add_poisson_gaussian_noise(
            moved, photons_at_one=1000.0, read_noise_e=2.0, rng=rng
        )
        planes.append(np.clip(noisy, 0.0, 1.0))
    return np.asarray(planes, dtype=np.float32), drift


@pytest.fixture(scope="module")
def made() -> tuple[zstack.PreparedStack, np.ndarray]:
    planes, drift = _make_stack(_in_focus(), np.random.default_rng(7))
    stack = zstack.ZStack("made.tif", planes[:, None], z_step_um=0.5)
    return zstack.prepare_stack(stack, crop_px=192), drift


def test_registration_recovers_subpixel_drift(made) -> None:
    prepared, drift = made
    reg = prepared.registration
    assert reg.reference_index == TRUE_INDEX  # the sharpest plane
    assert reg.trusted.all()
    # Moving plane k by -(drift_k - drift_ref) aligns it with the reference.
    truth = -(drift - drift[reg.reference_index])
    error_px = np.abs(reg.shifts_px - truth).max(axis=1)
    print("shift error px per plane:", np.round(error_px, 3).tolist())
    assert error_px.max() < 0.1
    assert np.abs(truth).max() > 1.0  # the drift was not trivial


def test_ground_truth_is_the_true_focus_and_z_labels(made) -> None:
    prepared, _ = made
    assert len(prepared.crops) == 4
    for crop in prepared.crops:
        assert crop.gt_index == TRUE_INDEX, crop.ssim_to_edof
        assert [prepared.z_um(k, crop) for k in range(len(Z_UM))] == pytest.approx(Z_UM)
    pairs = zstack.stack_pairs(prepared, max_defocus_um=2.0)
    assert sorted({z for _, _, z, _, _ in pairs}) == pytest.approx(np.arange(-2.0, 2.01, 0.5))
    for x, y, z_um, k, crop in pairs:
        assert z_um == pytest.approx(Z_UM[k])
        assert y.shape == x.shape == (1, 192, 192)
        if k == crop.gt_index:
            assert np.array_equal(x, y)


def test_crops_do_not_overlap_and_avoid_the_shifted_border(made) -> None:
    prepared, _ = made
    margin = np.ceil(np.abs(prepared.registration.shifts_px).max())
    height, width = prepared.registered.shape[2:]
    n = prepared.crop_px
    for c in prepared.crops:
        assert margin <= c.y0 and c.y0 + n <= height - margin
        assert margin <= c.x0 and c.x0 + n <= width - margin
    for a, b in itertools.combinations(prepared.crops, 2):
        assert abs(a.y0 - b.y0) >= n or abs(a.x0 - b.x0) >= n
    assert zstack.crop_origins((100, 700), 256, 0) == []
    assert zstack.crop_origins((520, 520), 256, 4) == [(4, 4), (4, 260), (260, 4), (260, 260)]


def test_fov_split_is_085_015_and_disjoint(tmp_path: Path) -> None:
    sources = [SourceImage(str(tmp_path / f"fov_{i:02d}.tif"), "made") for i in range(20)]
    split = zstack.split_fovs(sources)
    train = {name for name, s in split.items() if s == "train"}
    val = {name for name, s in split.items() if s == "val"}
    assert len(train) == 17 and len(val) == 3 and not train & val
    assert zstack.split_fovs(list(reversed(sources))) == split  # order does not matter
    with pytest.raises(ConfigError, match="at least 2"):
        zstack.split_fovs(sources[:1])
    with pytest.raises(ConfigError, match="share this file name"):
        zstack.split_fovs([sources[0], SourceImage(str(tmp_path / "x" / "fov_00.tif"), "m")])


def _write_fovs(folder: Path, n_fovs: int, size_px: int) -> list[Path]:
    """Stacks of different real regions, saved as OME-TIFF with PhysicalSizeZ."""
    image = _in_focus()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n_fovs):
        y0, x0 = (i // 2) * 256, (i % 2) * 256
        region = image[:, y0 : y0 + size_px + 2 * BORDER_PX, x0 : x0 + size_px + 2 * BORDER_PX]
        planes, _ = _make_stack(region, rng, max_shift_px=1.5)
        path = folder / f"fov_{i}.ome.tif"
        tifffile.imwrite(
            path,
            np.rint(planes * 65535).astype(np.uint16),
            ome=True,
            metadata={"axes": "ZYX", "PhysicalSizeZ": 0.5, "PhysicalSizeX": 0.25},
        )
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> zstack.ZStackBanks:
    folder = tmp_path_factory.mktemp("zstack")
    paths = _write_fovs(folder, 4, 200)
    return zstack.build_zstack_banks(paths, folder / "banks", crop_px=192, max_defocus_um=1.0)


def test_bank_loads_with_pairbank_and_split_manifest(banks) -> None:
    train, val = PairBank.load(banks.train), PairBank.load(banks.val)
    kept_z_um = Z_UM[np.abs(Z_UM) <= 1.0]  # max_defocus_um
    assert len(train) == 3 * len(kept_z_um) and len(val) == len(kept_z_um)  # a crop per FOV
    assert train.inputs.shape[1:] == (1, 192, 192) and train.targets.shape == train.inputs.shape
    assert sorted(set(train.defocus_um.tolist())) == pytest.approx(kept_z_um)
    manifest = json.loads(banks.manifest.read_text())
    assert len(manifest["train"]) == 3 and len(manifest["val"]) == 1
    assert not set(manifest["train"]) & set(manifest["val"])
    assert {Path(s).name for s in train.sources} == set(manifest["train"])
    assert {Path(s).name for s in val.sources} == set(manifest["val"])
    with np.load(banks.train) as f:
        assert (f["gt_index"] == TRUE_INDEX).all()
        assert np.allclose(f["z_um"], (f["plane_index"] - f["gt_index"]) * 0.5)
        assert np.allclose(f["meta"][:, 1], 0.25)  # pixel size from the OME metadata
    report = json.loads(banks.report.read_text())
    assert [len(s["shifts_px"]) for s in report["stacks"]] == [len(Z_UM)] * 4


@pytest.mark.slow  # torch's first steps: about 15 s of CPU
def test_training_runs_on_a_zstack_bank(banks, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from wsi_deepr.training import TrainConfig, train

    config = TrainConfig(
        name="zstack-tiny",
        modality="fluorescence",
        train_bank=str(banks.train),
        val_bank=str(banks.val),
        crop_px=192,
        simulation={"defocus_range_um": [-2.0, 3.0], "na": 0.75, "mpp_range": [0.25, 0.25]},
        widths=(4, 4, 4, 4, 4),
        iterations=1,
        batch_size=2,
        val_every=1,
        checkpoint_every=1,
    )
    summary = train(config, run_dir=tmp_path / "run")
    assert summary["iteration"] == 1 and np.isfinite(summary["best_val"])


def test_read_zstack_errors_name_the_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(MetadataError, match=r"plain\.tif: no z step"):
        zstack.read_zstack(plain)
    assert zstack.read_zstack(plain, z_step_um=0.2).planes.shape == (3, 1, 32, 32)
    single = tmp_path / "single.tif"
    tifffile.imwrite(single, np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match=r"single\.tif"):
        zstack.read_zstack(single, z_step_um=0.2)


def test_cli_pairs_zstack(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_deepr.cli import cli

    rng = np.random.default_rng(2)
    paths = []
    for i in range(2):
        path = tmp_path / f"s{i}.tif"
        tifffile.imwrite(
            path, (rng.random((3, 40, 40)) * 255).astype(np.uint8), photometric="minisblack"
        )
        paths.append(str(path))
    out = tmp_path / "banks"
    args = ["pairs", "zstack", *paths, "--out", str(out), "--crop-px", "32"]
    result = CliRunner().invoke(cli, [*args, "--z-step-um", "0.5"])
    assert result.exit_code == 0, result.output
    assert (out / "train.npz").exists() and (out / "val.npz").exists()
    assert (out / "splits.json").exists() and (out / "zstack_report.json").exists()
    missing = CliRunner().invoke(cli, args)
    assert isinstance(missing.exception, MetadataError)


@pytest.mark.skipif(not BEADS.exists(), reason="real bead stack not in ../shared/data/beads")
def test_real_bead_stack_ground_truth_is_the_brightest_plane() -> None:
    stack = zstack.read_zstack(BEADS)
    assert stack.z_step_um == pytest.approx(0.125)  # from the ImageJ metadata
    prepared = zstack.prepare_stack(stack, crop_px=128)
    peak_plane = int(np.argmax(stack.planes.reshape(len(stack.planes), -1).max(axis=1)))
    assert [c.gt_index for c in prepared.crops] == [peak_plane]
    reg = prepared.registration
    assert reg.trusted[peak_plane - 3 : peak_plane + 3].all()  # the bead is visible there
    assert np.abs(reg.shifts_px).max() < 10


def test_featureless_plane_keeps_its_neighbours_shift(made) -> None:
    prepared, _ = made
    planes = prepared.stack.planes[:6].copy()
    rng = np.random.default_rng(3)
    planes[0] = rng.normal(0.1, 0.01, size=planes[0].shape)  # no structure at all
    reg = zstack.register_planes(planes, reference_index=TRUE_INDEX)
    assert not reg.trusted[0] and reg.trusted[1:].all()
    assert np.array_equal(reg.shifts_px[0], reg.shifts_px[1])


def test_read_zstack_channels_and_ome_units(tmp_path: Path) -> None:
    planes = np.random.default_rng(4).integers(0, 4096, size=(5, 2, 24, 32), dtype=np.uint16)
    path = tmp_path / "two_channels.ome.tif"
    tifffile.imwrite(
        path,
        planes,
        ome=True,
        metadata={"axes": "ZCYX", "PhysicalSizeZ": 250.0, "PhysicalSizeZUnit": "nm"},
    )
    stack = zstack.read_zstack(path)
    assert stack.z_step_um == pytest.approx(0.25)
    assert stack.planes.shape == (5, 2, 24, 32)
    assert np.array_equal(np.rint(stack.planes * 65535).astype(np.uint16), planes)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((4, 24, 32, 3), np.uint8), photometric="rgb")
    assert zstack.read_zstack(rgb, z_step_um=1.0).planes.shape == (4, 3, 24, 32)
