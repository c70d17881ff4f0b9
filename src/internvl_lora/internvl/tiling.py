"""Dynamic high-resolution tiling and tile pixels, as the official `dynamic_preprocess` + `build_transform`.

An image is matched to the grid (columns x rows) whose aspect ratio is closest to its own among all
grids with min_num..max_num tiles, resized to that grid and cut row-major into square tiles; when the
grid has more than one tile, a thumbnail of the whole image is appended last.

Pixels are bit-identical to the official code by default (tests/reliability/test_pixels.py): PIL's
`resize` with its default filter for RGB (bicubic, as `image.resize((w, h))`), crops, the thumbnail as
`image.resize((S, S))`, then `ToTensor` and `Normalize` in torchvision's float32 order. Tiles are kept
as uint8 views into the resized grid (a crop copies pixels exactly, so a view is the same tile).
`fast=True` (opt-in `data.fast_resize`) resizes in torch's uint8 antialiased bicubic kernel instead:
about 5x faster, within a few /255 of PIL (docs/data.md gives the measured bound). No torchvision.
"""

from __future__ import annotations

import functools
import io
import random
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .constants import NORMALIZE

if TYPE_CHECKING:  # torch is imported where pixels become tensors: tile counting stays torch-free
    import torch


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_num <= cols*rows <= max_num, in the official order.

    The official code builds a set and sorts it by tile count; ties keep the set's iteration order,
    which is deterministic for small int tuples in CPython. We build the same set the same way so the
    order (and therefore the tie outcome) is identical.
    """
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to width/height.

    Tie rule: on an exactly equal difference a later (larger) grid wins only when the image has more
    than half the pixels of that grid.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, tile_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True) -> int:
    """How many tiles (grid, plus the thumbnail) an image of this size gets, without touching pixels."""
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def as_u8(img: Image.Image) -> torch.Tensor:
    """An RGB image -> (1, 3, H, W) uint8 tensor sharing the array's memory (channels-last layout)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays from PIL: never written to
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1).unsqueeze(0)


def resize_u8(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The opt-in fast resize: PIL's bicubic filter (a = -0.5, antialiased when shrinking) in torch's uint8
    kernel on a (1, 3, H, W) tensor; rounding differs from PIL by a few /255."""
    import torch

    if tuple(x.shape[-2:]) == (height, width):
        return x
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True)


def tile_pieces(image: Image.Image, cols: int, rows: int, tile_size: int, thumbnail: bool,
                fast: bool = False) -> list[torch.Tensor]:
    """The tiles of an RGB image for a (cols, rows) grid: uint8 (k, 3, S, S) pieces, one per grid row
    (views into the resized grid), row-major as the official crop loop, then the thumbnail (1, 3, S, S)."""
    s = tile_size
    if fast:
        x = as_u8(image)
        grid = resize_u8(x, cols * s, rows * s)[0]
        thumb = (lambda: resize_u8(x, s, s)) if thumbnail else None
    else:  # official: resized_img = image.resize((target_width, target_height)); default filter for RGB
        grid = as_u8(_resize(image, cols * s, rows * s))[0]
        thumb = (lambda: as_u8(_resize(image, s, s))) if thumbnail else None
    pieces = [grid[:, r * s:(r + 1) * s, :].unfold(2, s, s).permute(2, 0, 1, 3) for r in range(rows)]
    if thumb is not None:
        pieces.append(thumb())
    return pieces


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    # Pillow's default filter for RGB is BICUBIC (what the official call gets); named so it cannot drift
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)


def tile_images(pieces: list[torch.Tensor]) -> list[Image.Image]:
    """uint8 tile pieces -> one RGB PIL image per tile (the official crops)."""
    return [Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy())) for p in pieces for t in p]


def jpeg_reencode(tile: Image.Image, rng: random.Random) -> Image.Image:
    """The official `data_augment` transform: re-encode as JPEG with quality drawn from 75..100."""
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=rng.randint(75, 100))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@functools.lru_cache(maxsize=8)
def _mean_std(normalize_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in NORMALIZE[normalize_type])
    return mean, std


def normalize(pieces: list[torch.Tensor], normalize_type: str = "imagenet") -> torch.Tensor:
    """uint8 (k, 3, S, S) pieces -> one float32 (n, 3, S, S) tensor, bit-identical to torchvision's
    `ToTensor` (float32, then `div(255)`) and `Normalize` (`sub_(mean).div_(std)`, float32 mean and std)."""
    import torch

    mean, std = _mean_std(normalize_type)
    n = sum(p.shape[0] for p in pieces)
    out = torch.empty((n, *pieces[0].shape[1:]), dtype=torch.float32)
    o = 0
    for p in pieces:
        out[o:o + p.shape[0]].copy_(p)
        o += p.shape[0]
    return out.div_(255).sub_(mean).div_(std)
