"""Tile grid and blending window: coverage, partition of unity, identity round trip."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from wsi_deepr.errors import OptionError
from wsi_deepr.refocus import default_chunk_px, refocus_array
from wsi_deepr.tiling import TileGrid, plan_tiles


@st.composite
def grids(draw: st.DrawFn) -> tuple[TileGrid, int]:
    tile_px = draw(st.integers(2, 96))
    overlap_px = draw(st.integers(0, (tile_px - 1) // 2))
    extent_px = draw(st.integers(1, 700))
    return TileGrid(tile_px, overlap_px), extent_px


@settings(max_examples=300, deadline=None)
@given(grids())
def test_tiles_cover_every_pixel_and_weights_sum_to_exactly_one(case: tuple[TileGrid, int]):
    grid, extent_px = case
    origins = grid.origins(extent_px)
    weights = grid.weights(extent_px)
    tile_len = grid.tile_len(extent_px)
    covered = np.zeros(extent_px, dtype=int)
    total = np.zeros(extent_px, dtype=np.float32)
    for origin, weight in zip(origins, weights, strict=True):
        covered[origin : origin + tile_len] += 1
        total[origin : origin + tile_len] += weight
    assert origins[0] == 0 and origins[-1] + tile_len == extent_px
    assert np.all(np.diff(origins) > 0)
    assert covered.min() >= 1
    # neighbours overlap by at least overlap_px (where the axis allows it)
    assert np.all(origins[:-1] + tile_len - origins[1:] >= grid.overlap_px)
    assert np.all(total == 1.0)
    assert weights.dtype == np.float32 and weights.min() >= 0


@settings(max_examples=100, deadline=None)
@given(grids(), st.integers(1, 700))
def test_2d_weights_sum_to_exactly_one(case: tuple[TileGrid, int], width: int):
    grid, height = case
    plan = plan_tiles((height, width), grid)
    tile_h, tile_w = plan.tile_hw
    total = np.zeros((height, width), dtype=np.float32)
    for oy, wy in zip(plan.origins_y, plan.weights_y, strict=True):
        for ox, wx in zip(plan.origins_x, plan.weights_x, strict=True):
            total[oy : oy + tile_h, ox : ox + tile_w] += wy[:, None] * wx[None, :]
    assert np.all(total == 1.0)


def test_edge_tiles_have_no_ramp_toward_the_outside():
    weights = TileGrid(64, 16).weights(300)
    assert weights[0][0] == 1.0 and weights[-1][-1] == 1.0
    assert weights[0][-1] == 0.0  # the margin facing the neighbour


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 64).flatmap(
        lambda t: st.tuples(
            st.just(t),
            st.integers(0, (t - 1) // 2),
            st.integers(1, 150),
            st.integers(1, 150),
            st.integers(1, 3),
        )
    ),
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.uint8, np.uint16, np.float32]),
)
def test_identity_model_reproduces_the_input_bit_for_bit(case, seed, dtype):
    tile_px, overlap_px, height, width, channels = case
    grid = TileGrid(tile_px, overlap_px)
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        image = rng.random((channels, height, width), dtype=np.float32)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, (channels, height, width), dtype=dtype)
    mask = rng.random((max(1, height // 10), max(1, width // 10))) > 0.5
    plan = plan_tiles((height, width), grid, mask=mask, mask_downsample=10)
    chunk_px = default_chunk_px(grid, target_px=int(rng.integers(1, 100)))
    out = refocus_array(
        da.from_array(image, chunks=(channels, 37, 41)),
        plan,
        lambda batch: batch.copy(),
        mean=rng.uniform(0, 1, channels) * float(image.max()),
        std=rng.uniform(0.01, 0.5, channels) * float(image.max()),
        chunk_px=chunk_px,
        batch_size=3,
    )
    assert out.chunks[1][0] == min(chunk_px, height)
    result = out.compute(scheduler="sync")
    assert result.dtype == image.dtype
    if dtype == np.float32:  # no rounding step to absorb x * w: exact up to float32 eps
        np.testing.assert_allclose(result, image, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(result, image)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 48).flatmap(
        lambda t: st.tuples(
            st.just(t), st.integers(0, (t - 1) // 2), st.integers(20, 160), st.integers(20, 160)
        )
    ),
    st.integers(0, 2**32 - 1),
)
def test_partly_refocused_chunks_match_a_direct_blend(case, seed):
    """Chunks where only some tiles run the model (``--only-blurred``) against the blend
    computed directly in float64: within one grey level everywhere, and the input itself
    wherever no model tile reaches."""
    tile_px, overlap_px, height, width = case
    grid = TileGrid(tile_px, overlap_px)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4096, (2, height, width), dtype=np.uint16)
    mask = rng.random((max(1, height // 8), max(1, width // 8))) > 0.7
    plan = plan_tiles((height, width), grid, mask=mask, mask_downsample=8)
    mean, std = np.array([1800.0, 2100.0]), np.array([700.0, 900.0])

    def model(batch: np.ndarray) -> np.ndarray:  # not the identity: a visible change
        return np.tanh(batch) * 1.5 + 0.25

    out = refocus_array(
        da.from_array(image, chunks=(2, 29, 31)), plan, model, mean=mean, std=std,
        chunk_px=default_chunk_px(grid, target_px=int(rng.integers(1, 90))), batch_size=2,
    ).compute(scheduler="sync")  # fmt: skip

    m, s = mean[:, None, None], std[:, None, None]
    normalised = (image - m) / s
    total = np.zeros(image.shape)
    reached = np.zeros((height, width), dtype=bool)
    tile_h, tile_w = plan.tile_hw
    for i, (oy, wy) in enumerate(zip(plan.origins_y, plan.weights_y, strict=True)):
        for j, (ox, wx) in enumerate(zip(plan.origins_x, plan.weights_x, strict=True)):
            window = (slice(None), slice(oy, oy + tile_h), slice(ox, ox + tile_w))
            tile = normalised[window]
            if plan.tissue[i, j]:
                tile = model(tile)
                reached[window[1:]] |= (wy[:, None] * wx[None, :]) > 0
            total[window] += wy[:, None] * wx[None, :] * tile
    expected = np.clip(np.rint(total * s + m), 0, 65535)
    assert np.abs(out.astype(np.int64) - expected).max() <= 1
    np.testing.assert_array_equal(out[:, ~reached], image[:, ~reached])
    if plan.tissue.any():
        assert not np.array_equal(out, image)


def test_tissue_plan_marks_tiles_touching_the_mask():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 0] = True  # level pixels 0..99 x 0..99
    plan = plan_tiles((1000, 1000), TileGrid(200, 40), mask=mask, mask_downsample=100)
    assert plan.tissue[0, 0] and plan.tissue.sum() == 1
    assert plan.n_run == 1 and plan.n_skipped == plan.n_tiles - 1


@pytest.mark.parametrize(
    ("tile_px", "overlap_px"), [(512, 256), (512, 300), (0, 0), (16, -1), (8193, 0)]
)
def test_contradicting_options_are_refused(tile_px, overlap_px):
    with pytest.raises(OptionError):
        TileGrid(tile_px, overlap_px)


def test_tile_below_the_network_minimum_is_refused():
    with pytest.raises(OptionError, match="minimum"):
        TileGrid(8, 2).check_model(min_tile_px=16)


@pytest.mark.parametrize(
    "shape_yx", [(2967, 2220), (8192, 8192), (20000, 15000), (700, 500), (1100, 5000), (961, 961)]
)
@pytest.mark.parametrize("overlap_px", [0, 64, 128])
def test_fitted_grid_keeps_the_tile_counts_with_the_smallest_allowed_tile(shape_yx, overlap_px):
    grid = TileGrid(1024, overlap_px)
    fitted = grid.fitted(shape_yx)
    counts = [len(grid.origins(e)) for e in shape_yx]
    assert [len(fitted.origins(e)) for e in shape_yx] == counts
    assert fitted.overlap_px == overlap_px and fitted.tile_px <= grid.tile_px
    assert fitted.tile_px == grid.tile_px or fitted.tile_px % 16 == 0

    def work_px(g: TileGrid) -> int:  # pixels through the model
        return math.prod(len(g.origins(e)) * g.tile_len(e) for e in shape_yx)

    # brute force: no smaller multiple of 16 with the same counts does less work
    for smaller in range(fitted.tile_px - 16, 2 * overlap_px, -16):
        other = TileGrid(smaller, overlap_px)
        if [len(other.origins(e)) for e in shape_yx] == counts:
            assert work_px(other) >= work_px(fitted)
    assert work_px(fitted) <= work_px(grid)
    # the fitted tiles still cover every pixel with at least the minimum overlap
    for extent in shape_yx:
        origins = fitted.origins(extent)
        ends = origins + fitted.tile_len(extent)
        assert origins[0] == 0 and ends[-1] == extent
        assert np.all(ends[:-1] - origins[1:] >= overlap_px)


def test_cell_mask_weight_is_the_mask_averaged_over_a_centred_cell_window():
    """Against the upsampled mask convolved with a (cell + 1)-tap window whose end taps
    are halves (a window of one cell centred on the pixel's centre), in float64."""
    from scipy.ndimage import convolve1d

    from wsi_deepr.tiling import cell_mask_weight

    rng = np.random.default_rng(3)
    cells = rng.random((12, 15)) > 0.6
    cell = 16
    big = np.repeat(np.repeat(cells.astype(np.float64), cell, 0), cell, 1)
    kernel = np.ones(cell + 1) / cell
    kernel[[0, -1]] = 0.5 / cell
    padded = np.pad(big, 4 * cell)
    reference = convolve1d(convolve1d(padded, kernel, axis=0, mode="constant"), kernel, axis=1,
                           mode="constant")  # fmt: skip
    for y0, y1, x0, x1 in [
        (0, 192, 0, 240),
        (-20, 50, 30, 101),
        (150, 230, 200, 270),
        (5, 6, 7, 8),
    ]:
        got = cell_mask_weight(cells, cell, (y0, y1, x0, x1))
        want = reference[y0 + 4 * cell : y1 + 4 * cell, x0 + 4 * cell : x1 + 4 * cell]
        np.testing.assert_allclose(got, want, atol=1e-6)
    whole = cell_mask_weight(cells, cell, (0, 192, 0, 240))
    # exactly 0 (input kept bit for bit) and exactly 1 away from the cells' edges
    assert whole.min() == 0.0 and whole.max() == 1.0
    square = np.ones((3, 3), dtype=bool)
    inner = ndi.binary_erosion(big.astype(bool), square, iterations=cell // 2 + 1)
    assert np.all(whole[inner] == 1.0)
    outer = ~ndi.binary_dilation(big.astype(bool), square, iterations=cell // 2 + 1)
    assert np.all(whole[outer] == 0.0)


def test_crop_ramp_rises_like_a_tile_edge_only_at_edges_inside_the_tile():
    from wsi_deepr.tiling import crop_ramp

    grid = TileGrid(512, 64)
    assert np.all(crop_ramp(grid, 0, 512, 512) == 1.0)  # the whole tile: no ramp
    ramp = crop_ramp(grid, 100, 300, 512)
    margin, full = grid.margin_px, grid.overlap_px - grid.margin_px
    assert np.all(ramp[:margin] == 0) and np.all(ramp[-margin:] == 0)
    assert np.all(ramp[full:-full] == 1.0)
    assert np.all(np.diff(ramp[:full]) >= 0) and np.all(np.diff(ramp[-full:]) <= 0)
    edge = crop_ramp(grid, 0, 200, 512)  # starts on the tile's edge: only the far end ramps
    assert np.all(edge[: 200 - full] == 1.0) and edge[-1] == 0.0


def test_a_model_that_returns_its_input_keeps_cropped_tiles():
    """One channel, a crop as wide as its tile (a contiguous slice): the model's input must
    be a copy, or handing it back would zero the crop in the blend."""
    import dataclasses

    rng = np.random.default_rng(0)
    image = rng.random((1, 600, 600)).astype(np.float32)
    grid = TileGrid(256, 32)
    plan = plan_tiles((600, 600), grid)
    crops = np.zeros((*plan.tissue.shape, 4), dtype=np.int64)
    crops[..., 1], crops[..., 3] = 256, 256
    crops[1, 1] = (64, 192, 0, 256)
    cells = np.ones((600 // 30 + 1, 600 // 30 + 1), dtype=bool)
    for selection in ({"crops": crops}, {"crops": crops, "cells": cells, "cell_px": 30}):
        selected = dataclasses.replace(plan, **selection)
        out = refocus_array(da.from_array(image, chunks=(1, 300, 300)), selected, lambda b: b,
                            mean=np.zeros(1), std=np.ones(1), chunk_px=256)  # fmt: skip
        np.testing.assert_allclose(np.asarray(out), image, atol=1e-5)
