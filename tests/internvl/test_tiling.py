"""Dynamic tiling against the official `dynamic_preprocess` / `find_closest_aspect_ratio` (spec §3.1, §3.3).

A small reference that follows the official algorithm step by step is written here and compared with
`internvl_lora.internvl.tiling` on the spec's test vectors and on generated sizes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_lora.internvl.tiling import (
    as_u8,
    candidate_grids,
    closest_grid,
    jpeg_reencode,
    normalize,
    num_tiles,
    tile_images,
    tile_pieces,
)


def tile_image(image, tile_size, max_num, min_num=1, use_thumbnail=True):
    """PIL tiles through the library's grid choice and tile cutting."""
    cols, rows = closest_grid(*image.size, candidate_grids(min_num, max_num), tile_size)
    return tile_images(tile_pieces(image, cols, rows, tile_size, use_thumbnail and cols * rows > 1))

# --------------------------------------------------------------------------------------------------
# reference


def ref_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The official construction: a set comprehension over n, i, j, then a stable sort by tile count."""
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(ratios, key=lambda r: r[0] * r[1])


def ref_closest(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in ref_candidates(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


# --------------------------------------------------------------------------------------------------
# spec vectors


@pytest.mark.parametrize("w,h,max_num,grid,count", [
    (448, 448, 12, (1, 1), 1),
    (800, 600, 12, (4, 3), 13),
    (800, 600, 6, (3, 2), 7),
    (1920, 1080, 12, (4, 2), 9),
    (1920, 1080, 6, (2, 1), 3),
    (1000, 1000, 12, (3, 3), 10),  # tie rule: 1e6 > 0.5 * 448^2 * 9
    (500, 500, 12, (1, 1), 1),  # tie rule: 250000 is not > half of a 2x2 grid
    (300, 1000, 6, (1, 3), 4),
    (4000, 1000, 12, (4, 1), 5),
    (896, 448, 12, (2, 1), 3),
])
def test_spec_vectors(w, h, max_num, grid, count):
    assert closest_grid(w, h, candidate_grids(1, max_num), 448) == grid
    assert ref_closest(w, h, 1, max_num, 448) == grid
    assert num_tiles(w, h, 448, max_num) == count
    assert num_tiles(w, h, 448, max_num, use_thumbnail=False) == grid[0] * grid[1]


@pytest.mark.parametrize("min_num,max_num", [(1, 1), (1, 6), (1, 12), (2, 6), (3, 24), (1, 40)])
def test_candidate_order_is_official(min_num, max_num):
    got = candidate_grids(min_num, max_num)
    assert got == ref_candidates(min_num, max_num)
    products = [c * r for c, r in got]
    assert products == sorted(products)
    assert all(min_num <= p <= max_num for p in products)
    assert len(set(got)) == len(got) == sum(1 for c in range(1, max_num + 1) for r in range(1, max_num + 1)
                                            if min_num <= c * r <= max_num)


def test_candidates_for_max_6_start_as_expected():
    got = candidate_grids(1, 6)
    assert got[0] == (1, 1)
    assert set(got[1:3]) == {(1, 2), (2, 1)}
    assert set(got[-4:]) == {(1, 6), (2, 3), (3, 2), (6, 1)}


def test_tie_between_different_ratios_depends_on_area():
    grids = candidate_grids(1, 2)  # (1,1), (1,2)/(2,1): aspect 1.5 is exactly between 1 and 2
    assert closest_grid(600, 400, grids, 448) == (2, 1)  # 240000 > 0.5 * 448^2 * 2
    assert closest_grid(300, 200, grids, 448) == (1, 1)  # 60000 is not
    assert closest_grid(400, 600, grids, 448) == ref_closest(400, 600, 1, 2, 448)


# --------------------------------------------------------------------------------------------------
# pixels


def _coded_image(cols: int, rows: int, t: int) -> Image.Image:
    """R = x gradient, G = y gradient, B = tile index * 20 in row-major order."""
    w, h = cols * t, rows * t
    x = np.arange(w)[None, :].repeat(h, 0)
    y = np.arange(h)[:, None].repeat(w, 1)
    k = (y // t) * cols + (x // t)
    arr = np.stack([(x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), k * 20], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def test_tiles_are_row_major_crops_with_thumbnail_last():
    t = 32
    img = _coded_image(3, 2, t)  # aspect 1.5 -> grid (3, 2); resizing to the grid size keeps pixels
    tiles = tile_image(img, t, max_num=6)
    assert len(tiles) == 7
    src = np.asarray(img)
    for k, tile in enumerate(tiles[:6]):
        a = np.asarray(tile)
        assert a.shape == (t, t, 3)
        assert (a[..., 2] == k * 20).all(), f"tile {k} is not the row-major crop {k}"
        x0, y0 = (k % 3) * t, (k // 3) * t
        assert np.array_equal(a, src[y0:y0 + t, x0:x0 + t])
    thumb = tiles[-1]
    assert np.array_equal(np.asarray(thumb), np.asarray(img.resize((t, t))))  # official: default filter
    assert len(tile_image(img, t, max_num=6, use_thumbnail=False)) == 6


def test_tiles_match_official_resize_and_crop_on_a_gradient():
    t = 16
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 91, 3), dtype=np.uint8), "RGB")
    cols, rows = ref_closest(91, 37, 1, 12, t)
    tiles = tile_image(img, t, max_num=12)
    resized = np.asarray(img.resize((cols * t, rows * t)))  # official: image.resize((tw, th))
    assert len(tiles) == cols * rows + 1
    for k in range(cols * rows):
        x0, y0 = (k % cols) * t, (k // cols) * t
        assert np.array_equal(np.asarray(tiles[k]), resized[y0:y0 + t, x0:x0 + t])


def test_single_tile_has_no_thumbnail():
    img = Image.new("RGB", (100, 100), (10, 20, 30))
    tiles = tile_image(img, 448, max_num=12)
    assert len(tiles) == 1 and tiles[0].size == (448, 448)


# --------------------------------------------------------------------------------------------------
# normalization

NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_normalize_types(kind):
    mean, std = NORMS[kind]
    color = (200, 100, 50)
    tiles = [Image.new("RGB", (8, 8), color), Image.new("RGB", (8, 8), (0, 0, 0))]
    x = normalize([as_u8(t) for t in tiles], kind)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((8, 8), (color[c] / 255 - mean[c]) / std[c]), atol=1e-6)
        assert torch.allclose(x[1, c], torch.full((8, 8), -mean[c] / std[c]), atol=1e-6)


def test_normalize_is_to_tensor_then_normalize_in_float32():
    x = normalize([as_u8(Image.new("RGB", (8, 8), (128, 3, 255)))], "imagenet")
    mean, std = NORMS["imagenet"]
    want = torch.tensor([128, 3, 255], dtype=torch.float32).div(255)
    want = want.sub_(torch.tensor(mean, dtype=torch.float32)).div_(torch.tensor(std, dtype=torch.float32))
    assert torch.equal(x[0, :, 0, 0], want)
    with pytest.raises(KeyError):
        normalize([as_u8(Image.new("RGB", (8, 8)))], "nope")


def test_jpeg_reencode_keeps_size_and_mode():
    img = _coded_image(1, 1, 32)
    out = jpeg_reencode(img, random.Random(0))
    assert out.size == img.size and out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - np.asarray(img).astype(int)).mean() < 20


# --------------------------------------------------------------------------------------------------
# properties

SIZES = st.integers(1, 5000)
PROPS = settings(max_examples=150, deadline=None, derandomize=True)


@PROPS
@given(w=SIZES, h=SIZES, min_num=st.integers(1, 4), extra=st.integers(0, 20), t=st.sampled_from([14, 224, 448]))
def test_grid_matches_reference_and_is_optimal(w, h, min_num, extra, t):
    max_num = min_num + extra
    grids = candidate_grids(min_num, max_num)
    cols, rows = closest_grid(w, h, grids, t)
    assert (cols, rows) == ref_closest(w, h, min_num, max_num, t)
    if min_num == 1 or (cols, rows) != (1, 1):
        assert (cols, rows) in grids
        assert min_num <= cols * rows <= max_num
        best = min(abs(w / h - c / r) for c, r in grids)
        assert abs(w / h - cols / rows) == best


@PROPS
@given(w=SIZES, h=SIZES, max_num=st.integers(1, 24), thumb=st.booleans())
def test_tile_count_bounds(w, h, max_num, thumb):
    n = num_tiles(w, h, 448, max_num, use_thumbnail=thumb)
    grid = n - 1 if (thumb and n > 1) else n
    assert 1 <= grid <= max_num
    if thumb and grid > 1:
        assert n == grid + 1
    else:
        assert n == grid


@settings(max_examples=60, deadline=None, derandomize=True)
@given(w=st.integers(1, 120), h=st.integers(1, 120), min_num=st.integers(1, 3), extra=st.integers(0, 9),
       thumb=st.booleans())
def test_num_tiles_equals_len_tile_image_and_tiles_are_square(w, h, min_num, extra, thumb):
    t = 8
    img = Image.new("RGB", (w, h), (w % 256, h % 256, 7))
    tiles = tile_image(img, t, max_num=min_num + extra, min_num=min_num, use_thumbnail=thumb)
    assert len(tiles) == num_tiles(w, h, t, min_num + extra, min_num=min_num, use_thumbnail=thumb)
    assert all(tile.size == (t, t) for tile in tiles)


@PROPS
@given(w=st.integers(1, 64), h=st.integers(1, 64), k=st.integers(2, 50), max_num=st.integers(1, 16))
def test_grid_invariant_to_scaling_when_area_is_large(w, h, k, max_num):
    """Same aspect ratio and both areas above half of the largest grid: the tie rule agrees, so the grid is
    the same."""
    t = 14
    scale = k
    while (w * scale) * (h * scale) <= 0.5 * t * t * max_num:
        scale += 1
    grids = candidate_grids(1, max_num)
    big = closest_grid(w * scale, h * scale, grids, t)
    bigger = closest_grid(w * scale * 3, h * scale * 3, grids, t)
    assert big == bigger


@PROPS
@given(w=SIZES, h=SIZES, max_num=st.integers(1, 12))
def test_transposed_image_gets_transposed_grid_when_no_tie(w, h, max_num):
    grids = candidate_grids(1, max_num)
    cols, rows = closest_grid(w, h, grids, 448)
    diffs = sorted(abs(w / h - c / r) for c, r in grids)
    if len(diffs) == 1 or diffs[0] != diffs[1]:
        # a unique best ratio for w/h; for h/w the transposed grid is best (up to float rounding)
        r2 = closest_grid(h, w, grids, 448)
        assert abs((h / w) - r2[0] / r2[1]) <= abs((h / w) - rows / cols) + 1e-12
