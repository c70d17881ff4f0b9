"""Dynamic high-resolution tiling and tile normalization, as the official `dynamic_preprocess`.

An image is matched to the grid (columns x rows) whose aspect ratio is closest to its own among all
grids with min_num..max_num tiles, resized to that grid and cut row-major into square tiles; when the
grid has more than one tile, a thumbnail of the whole image is appended last. Images go through PIL
only (no torchvision).
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from .constants import NORMALIZE


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


def tile_image(
    image: Image.Image, tile_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Cut an RGB image into tiles; the thumbnail (if any) is last."""
    width, height = image.size
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        x0, y0 = (k % cols) * tile_size, (k // cols) * tile_size
        tiles.append(resized.crop((x0, y0, x0 + tile_size, y0 + tile_size)))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return tiles


def num_tiles(width: int, height: int, tile_size: int, max_num: int, min_num: int = 1, use_thumbnail: bool = True) -> int:
    """How many tiles `tile_image` makes for an image of this size, without touching pixels."""
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def jpeg_reencode(tile: Image.Image, rng: random.Random) -> Image.Image:
    """The official `data_augment` transform: re-encode as JPEG with quality drawn from 75..100."""
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=rng.randint(75, 100))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def normalize_tiles(tiles: list[Image.Image], tile_size: int, normalize_type: str = "imagenet") -> torch.Tensor:
    """RGB -> resize to tile_size (bicubic) -> [0,1] -> (x - mean) / std; returns (N, 3, S, S) float32."""
    mean, std = NORMALIZE[normalize_type]
    arrays = []
    for tile in tiles:
        tile = tile.convert("RGB")
        if tile.size != (tile_size, tile_size):
            tile = tile.resize((tile_size, tile_size), Image.BICUBIC)
        arrays.append(np.asarray(tile, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
