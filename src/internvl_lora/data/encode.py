"""From a validated record to model inputs: tiles, placeholder expansion, template, labels, truncation.

This is the official preprocessing (dataset.py `multi_modal_get_item` and friends) with two fixes:
a sample that does not fit is never silently replaced or given a zero loss — it is reported — and a
truncation can never cut inside an image block.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import DataError
from ..internvl.checkpoint import CheckpointInfo
from ..internvl.constants import (
    IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN,
)
from ..internvl.templates import Template, encode_conversation, get_template
from ..internvl.tiling import jpeg_reencode, normalize_tiles, num_tiles, tile_image
from .records import Record

IMAGE_BLOCK = IMG_START_TOKEN + IMG_CONTEXT_TOKEN + IMG_END_TOKEN


@dataclass
class EncodeSettings:
    """Everything that decides how a record becomes tokens and tiles."""

    template: Template
    tile_size: int
    tokens_per_tile: int
    max_dynamic_patch: int
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    normalize_type: str = "imagenet"
    max_length: int = 8192
    truncation: str = "drop"  # "drop" the sample | "cut_text": cut text after the last image block
    max_image_pixels: int = 8192 * 8192
    video_sample: str = "rand"
    min_num_frames: int = 8
    max_num_frames: int = 32

    @classmethod
    def from_checkpoint(cls, info: CheckpointInfo, template: str | None = None, **overrides) -> "EncodeSettings":
        fields = dict(
            template=get_template(template or info.template), tile_size=info.tile_size,
            tokens_per_tile=info.tokens_per_tile, max_dynamic_patch=info.max_dynamic_patch,
            min_dynamic_patch=info.min_dynamic_patch, use_thumbnail=info.use_thumbnail,
            dynamic_image_size=info.dynamic_image_size, normalize_type=info.normalize_type,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_tiles: list[int]  # one entry per image (video frames count as images)
    pixel_values: torch.Tensor | None  # (sum(num_tiles), 3, S, S) or None for text-only
    tiles: list[Image.Image] | None = None  # un-normalized tiles, when asked for


def open_image(path: str, max_pixels: int, source: tuple[str, int], decode: bool = True) -> Image.Image:
    """Open an image safely: a clear error for missing, unreadable, truncated or oversized files."""
    file, line = source
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise DataError("missing_image", f"image not found: {path}", file, line) from None
    except Image.DecompressionBombError as e:
        raise DataError("huge_image", f"{path}: {e}", file, line) from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise DataError("corrupt_image", f"cannot read image {path}: {e}", file, line) from None
    w, h = img.size
    if w * h > max_pixels:
        raise DataError("huge_image", f"{path} is {w}x{h} pixels, above the limit of {max_pixels} (data.max_image_pixels)", file, line)
    if decode:
        try:
            img.load()
            img = img.convert("RGB")
        except Exception as e:
            raise DataError("corrupt_image", f"cannot decode image {path} (truncated or corrupt): {e}", file, line) from None
    return img


def check_image(path: str, max_pixels: int, source: tuple[str, int]) -> tuple[int, int]:
    """Size of an image after a cheap but complete decode (JPEG draft mode at 1/8 scale)."""
    img = open_image(path, max_pixels, source, decode=False)
    w, h = img.size
    try:
        if img.format == "JPEG":
            img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        img.load()
    except Exception as e:
        raise DataError("corrupt_image", f"cannot decode image {path} (truncated or corrupt): {e}", *source) from None
    return w, h


def tiles_budget(settings: EncodeSettings, dataset_max_patch: int | None, n_images: int) -> int:
    """Max tiles per image: the dataset's (or global) max_dynamic_patch split over the images (official rule)."""
    max_patch = dataset_max_patch or settings.max_dynamic_patch
    return max(1, max_patch // n_images) if n_images > 1 else max_patch


def expand_turns(turns: list[tuple[str, str]], placeholder: str, n: int) -> list[tuple[str, str]]:
    """Replace the first n placeholders (human turns, in order) by one image block each."""
    out, left = [], n
    for role, text in turns:
        if role == "human":
            while left and placeholder in text:
                text = text.replace(placeholder, IMAGE_BLOCK, 1)
                left -= 1
        out.append((role, text))
    return out


def _expand_context(ids: list[int], labels: list[int], context_id: int, counts: list[int]) -> tuple[list[int], list[int]]:
    """Repeat the k-th context token counts[k] times (ids identical to tokenizing the long run)."""
    out_ids, out_labels, k = [], [], 0
    for tok, lab in zip(ids, labels):
        if tok == context_id:
            if k >= len(counts):
                raise ValueError("more image blocks than images")
            out_ids.extend([context_id] * counts[k])
            out_labels.extend([IGNORE_INDEX] * counts[k])
            k += 1
        else:
            out_ids.append(tok)
            out_labels.append(lab)
    if k != len(counts):
        raise ValueError(f"{k} image blocks for {len(counts)} images")
    return out_ids, out_labels


def _truncate(ids: list[int], labels: list[int], settings: EncodeSettings, end_id: int, source) -> tuple[list[int], list[int]]:
    limit = settings.max_length
    if len(ids) <= limit:
        return ids, labels
    if settings.truncation == "drop":
        raise DataError("too_long", f"{len(ids)} tokens after image expansion, above max_length {limit} "
                        "(raise data.max_length, lower max_dynamic_patch, or set data.truncation: cut_text)", *source)
    last_img_end = max((i for i, t in enumerate(ids) if t == end_id), default=-1)
    if last_img_end >= limit:
        raise DataError("too_long", f"{len(ids)} tokens; cutting at max_length {limit} would cut inside an image "
                        "block (raise data.max_length or lower max_dynamic_patch)", *source)
    return ids[:limit], labels[:limit]


def encode_record(record: Record, tokenizer, settings: EncodeSettings, *, dataset_max_patch: int | None = None,
                  augment: bool = False, rng: random.Random | None = None, load_pixels: bool = True,
                  keep_tiles: bool = False) -> Encoded:
    """Tokens, labels and tiles of one record. Raises DataError when the sample cannot be trained on."""
    rng = rng or random.Random(0)
    source = record.source
    turns = list(record.turns)
    tile_lists: list[list[Image.Image]] = []
    counts: list[int] = []
    if record.images:
        budget = tiles_budget(settings, dataset_max_patch, len(record.images))
        for path in record.images:
            if load_pixels:
                img = open_image(path, settings.max_image_pixels, source)
                tiles = (tile_image(img, settings.tile_size, budget, settings.min_dynamic_patch, settings.use_thumbnail)
                         if settings.dynamic_image_size else [img])
                if augment:
                    tiles = [jpeg_reencode(t, rng) for t in tiles]
                tile_lists.append(tiles)
                counts.append(len(tiles))
            else:
                w, h = check_image(path, settings.max_image_pixels, source)
                counts.append(num_tiles(w, h, settings.tile_size, budget, settings.min_dynamic_patch,
                                        settings.use_thumbnail) if settings.dynamic_image_size else 1)
        turns = expand_turns(turns, IMAGE_PLACEHOLDER, len(record.images))
    elif record.video:
        from .video import expand_video_placeholder, load_video

        try:
            frames = load_video(record.video, settings.video_sample, settings.min_num_frames,
                                settings.max_num_frames, clip=record.clip, rng=rng)
        except DataError as e:
            raise DataError(e.kind, e.detail, *source) from None
        turns[0] = (turns[0][0], expand_video_placeholder(turns[0][1], len(frames)))
        tile_lists = [[f] for f in frames]
        counts = [1] * len(frames)
        turns = expand_turns(turns, IMAGE_PLACEHOLDER, len(frames))

    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    ids, labels = encode_conversation(tokenizer, settings.template, turns, record.system)
    ids, labels = _expand_context(ids, labels, context_id, [c * settings.tokens_per_tile for c in counts])
    ids, labels = _truncate(ids, labels, settings, end_id, source)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError("no_trained_tokens", "no answer token is left to train on", *source)
    pixel_values = None
    flat = [t for tiles in tile_lists for t in tiles]
    if load_pixels and flat:
        pixel_values = normalize_tiles(flat, settings.tile_size, settings.normalize_type)
    return Encoded(ids, labels, counts, pixel_values, flat if keep_tiles else None)
