"""From a validated record to model inputs: tiles, placeholder expansion, template, labels, truncation.

This is the official preprocessing (dataset.py `multi_modal_get_item` and friends) with these fixes:
a sample that does not fit is never silently replaced or given a zero loss — it is reported — a
truncation can never cut inside an image block, and a sample with no trained token is an error.

Pixels are the official ones by default, bit for bit (`internvl.tiling`): `Image.open(path).convert("RGB")`,
PIL bicubic resize, crops, thumbnail, `ToTensor`, `Normalize`. Opt-in settings trade that for speed
(`fast_resize`: torch's uint8 resize; `jpeg_draft`: reduced-scale JPEG decode) or fix what the official
conversion gets wrong (`exif_transpose`, `alpha_background`); every image of training, chat and
validate is opened by `images.open_image`, so they all apply them the same way. The audit's cheap decode
(`check_image`) also reports images the conversion blanks or turns sideways (docs/data.md).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import DataError, UserError
from ..internvl.checkpoint import CheckpointInfo
from ..internvl.constants import (
    IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, NORMALIZE,
)
from ..internvl.templates import Template, TemplateMismatch, encode_conversation, get_template
from ..internvl.tiling import (  # noqa: F401  (normalize, tile_images: the pixel API callers import from here)
    as_u8, candidate_grids, closest_grid, jpeg_reencode, normalize, tile_images, tile_pieces,
)
from .images import ALPHA_BACKGROUNDS, ImageCheck, check_image, decode_image, exif_orientation, open_image
from .records import Record

if TYPE_CHECKING:  # tensors only where pixels are loaded: the audit and `data check` stay torch-free
    import torch

IMAGE_BLOCK = IMG_START_TOKEN + IMG_CONTEXT_TOKEN + IMG_END_TOKEN
TRUNCATION_POLICIES = ("drop", "cut_text")


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
    jpeg_draft: bool = False  # decode JPEGs at reduced scale when shrunk 2x or more (faster; ~1/255 pixel difference)
    fast_resize: bool = False  # resize in torch's uint8 bicubic kernel instead of PIL (faster; not bit-identical)
    exif_transpose: bool = False  # rotate by the EXIF orientation (official: pixels used as stored)
    alpha_background: str | None = None  # None: alpha dropped as convert("RGB") | "white": composited on white

    def __post_init__(self):
        if self.alpha_background not in ALPHA_BACKGROUNDS:
            raise UserError(f"alpha_background must be null or white, got {self.alpha_background!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise UserError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {self.truncation!r}")
        if self.normalize_type not in NORMALIZE:
            raise UserError(f"normalize_type must be one of {', '.join(NORMALIZE)}, got {self.normalize_type!r}")
        if self.tile_size < 1 or self.tokens_per_tile < 1 or self.max_dynamic_patch < 1:
            raise UserError("tile_size, tokens_per_tile and max_dynamic_patch must be >= 1")
        if not 1 <= self.min_num_frames <= self.max_num_frames:
            raise UserError(f"need 1 <= min_num_frames <= max_num_frames, got {self.min_num_frames} and "
                            f"{self.max_num_frames}")

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
    num_tiles: list[int]  # one entry per image (video frames count as images, one tile each)
    pixel_values: torch.Tensor | None  # (sum(num_tiles), 3, S, S) float32, or None for text-only / no pixels
    tiles: list[Image.Image] | None = None  # tiles before normalization (tile_size square), when asked for
    cut: int = 0  # tokens removed by `cut_text` truncation
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, message), from the audit's image check


@functools.lru_cache(maxsize=64)
def _grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    return tuple(candidate_grids(min_num, max_num))


def tile_grid(width: int, height: int, settings: EncodeSettings, max_num: int) -> tuple[int, int, bool]:
    """(cols, rows, thumbnail) of the official tiling for an image of this size; (1, 1, False) without
    dynamic tiling (the whole image resized to one tile)."""
    if not settings.dynamic_image_size:
        return 1, 1, False
    min_num = min(settings.min_dynamic_patch, max_num)
    cols, rows = closest_grid(width, height, list(_grids(min_num, max_num)), settings.tile_size)
    return cols, rows, settings.use_thumbnail and cols * rows > 1


def count_tiles(width: int, height: int, settings: EncodeSettings, max_num: int) -> int:
    cols, rows, thumb = tile_grid(width, height, settings, max_num)
    return cols * rows + int(thumb)


def image_tiles(path: str, settings: EncodeSettings, max_num: int, source: tuple[str, int]) -> list[torch.Tensor]:
    """The tiles of one image, uint8 (k, 3, S, S) pieces (views, not copies): the grid row by row, row-major
    as the official crop order, then the thumbnail."""
    s = settings.tile_size
    img = open_image(path, settings.max_image_pixels, source, decode=False)
    w, h = img.size
    if settings.exif_transpose and exif_orientation(img) in (5, 6, 7, 8):
        w, h = h, w
    cols, rows, thumb = tile_grid(w, h, settings, max_num)
    draft = (cols * s, rows * s) if settings.jpeg_draft else None
    if draft and (w, h) != img.size:
        draft = draft[::-1]  # the stored image is transposed
    img = decode_image(img, path, source, draft, settings)
    return tile_pieces(img, cols, rows, s, thumb, fast=settings.fast_resize)


def frame_tile(frame: Image.Image, tile_size: int, fast_resize: bool = False) -> torch.Tensor:
    """A video frame as one tile (official: `dynamic_preprocess(max_num=1)` = resize to S x S)."""
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    return tile_pieces(frame, 1, 1, tile_size, False, fast=fast_resize)[0]


def _augment(pieces: list[torch.Tensor], rng: random.Random) -> list[torch.Tensor]:
    """The official `data_augment`: every tile re-encoded as JPEG with quality drawn from 75..100."""
    return [as_u8(jpeg_reencode(t, rng)) for t in tile_images(pieces)]


def tiles_budget(settings: EncodeSettings, dataset_max_patch: int | None, n_images: int) -> int:
    """Max tiles per image: the dataset's (or global) max_dynamic_patch split over the images (official rule)."""
    max_patch = dataset_max_patch or settings.max_dynamic_patch
    return max(1, max_patch // n_images) if n_images > 1 else max_patch


def _numpy_rng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(64))


# --------------------------------------------------------------------------------------------------
# tokens


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


def _expand_context(ids: list[int], labels: list[int], context_id: int, counts: list[int], source) -> tuple[list[int], list[int]]:
    """Repeat the k-th context token counts[k] times (ids identical to tokenizing the long run)."""
    out_ids, out_labels, k = [], [], 0
    for tok, lab in zip(ids, labels):
        if tok == context_id:
            if k >= len(counts):
                raise DataError("image_count", "the text holds more image blocks than the record has images", *source)
            out_ids.extend([context_id] * counts[k])
            out_labels.extend([IGNORE_INDEX] * counts[k])
            k += 1
        else:
            out_ids.append(tok)
            out_labels.append(lab)
    if k != len(counts):
        raise DataError("image_count", f"{k} image placeholder(s) reached the prompt for {len(counts)} image(s)", *source)
    return out_ids, out_labels


def _truncate(ids: list[int], labels: list[int], settings: EncodeSettings, end_id: int, source) -> tuple[list[int], list[int], int]:
    limit = settings.max_length
    if len(ids) <= limit:
        return ids, labels, 0
    if settings.truncation == "drop":
        raise DataError("too_long", f"{len(ids)} tokens after image expansion, above max_length {limit} "
                        "(raise data.max_length, lower max_dynamic_patch, or set data.truncation: cut_text)", *source)
    last_img_end = max((i for i, t in enumerate(ids) if t == end_id), default=-1)
    if last_img_end >= limit:
        raise DataError("too_long", f"{len(ids)} tokens; cutting at max_length {limit} would cut inside an image "
                        "block (raise data.max_length or lower max_dynamic_patch)", *source)
    return ids[:limit], labels[:limit], len(ids) - limit


def encode_record(record: Record, tokenizer, settings: EncodeSettings, *, dataset_max_patch: int | None = None,
                  augment: bool = False, rng: random.Random | None = None, load_pixels: bool = True,
                  keep_tiles: bool = False, size_cache: dict | None = None,
                  video_frames: int | None = None) -> Encoded:
    """Tokens, labels and tiles of one record. Raises DataError when the sample cannot be trained on.

    `load_pixels=False` (the audit): images are checked and only their sizes used; a video counts as its
    worst case (see `probe_video`). `augment`: the official `data_augment` JPEG re-encode of every tile
    (quality 75..100 from `rng`); never for video. `size_cache`: path -> size or DataError, shared
    between calls so an image used by many samples is checked once. `video_frames` (with
    `load_pixels=False`): count a video as this many frames without opening it.
    """
    media = encode_media(record, settings, dataset_max_patch=dataset_max_patch, augment=augment, rng=rng,
                         load_pixels=load_pixels, size_cache=size_cache, video_frames=video_frames)
    ids, labels, cut = encode_text(media.turns, record.system, media.num_tiles, tokenizer, settings, record.source)
    pixel_values, kept = media.pixels(settings, keep_tiles)
    return Encoded(ids, labels, media.num_tiles, pixel_values, kept, cut, media.warnings)


@dataclass
class Media:
    """A record's images or video frames, tiled: the turns with placeholders expanded to image blocks,
    tiles per image, the tiles themselves (when loaded) and the audit's image warnings."""

    turns: list[tuple[str, str]]
    num_tiles: list[int]
    pieces: list[torch.Tensor]
    warnings: list[tuple[str, str]]

    def pixels(self, settings: EncodeSettings, keep_tiles: bool = False):
        """(pixel_values, tiles before normalization when `keep_tiles`), or (None, None) without pixels."""
        if not self.pieces:
            return None, None
        return normalize(self.pieces, settings.normalize_type), tile_images(self.pieces) if keep_tiles else None


def encode_media(record: Record, settings: EncodeSettings, *, dataset_max_patch: int | None = None,
                 augment: bool = False, rng: random.Random | None = None, load_pixels: bool = True,
                 size_cache: dict | None = None, video_frames: int | None = None) -> Media:
    """The media half of `encode_record` (same arguments): tiles, counts and the expanded turns."""
    rng = rng or random.Random(0)
    source = record.source
    turns = list(record.turns)
    pieces: list[torch.Tensor] = []
    counts: list[int] = []
    found: list[tuple[str, str]] = []
    if record.images:
        budget = tiles_budget(settings, dataset_max_patch, len(record.images))
        for path in record.images:
            if load_pixels:
                tiles = image_tiles(path, settings, budget, source)
                if augment:
                    tiles = _augment(tiles, rng)
                pieces += tiles
                counts.append(sum(t.shape[0] for t in tiles))
            else:
                check = _cached_check(path, settings, source, size_cache)
                counts.append(count_tiles(*check.size, settings, budget))
                found += check.warnings
        turns = expand_turns(turns, IMAGE_PLACEHOLDER, len(record.images))
    elif record.video:
        from .video import expand_video_placeholder, load_video, video_error
        from .video_probe import probe_video

        if load_pixels:
            try:
                frames = load_video(record.video, settings.video_sample, settings.min_num_frames,
                                    settings.max_num_frames, clip=record.clip, rng=_numpy_rng(rng))
            except DataError as e:
                raise video_error(e, source) from None
            except ValueError as e:
                raise UserError(f"video sampling: {e}") from None
            pieces = [frame_tile(f, settings.tile_size, settings.fast_resize) for f in frames]
            n_frames = len(frames)
        elif video_frames is not None:
            n_frames = video_frames
        else:
            n_frames = probe_video(record.video, settings, record.clip, source)
        turns[0] = (turns[0][0], expand_video_placeholder(turns[0][1], n_frames))
        counts = [1] * n_frames
        turns = expand_turns(turns, IMAGE_PLACEHOLDER, n_frames)
    return Media(turns, counts, pieces, found)


def encode_text(turns: list[tuple[str, str]], system: str | None, num_tiles: list[int], tokenizer,
                settings: EncodeSettings, source) -> tuple[list[int], list[int], int]:
    """The text half of `encode_record`: template, label mask, image-token expansion and truncation of
    turns whose placeholders `encode_media` expanded. Returns (input_ids, labels, tokens cut)."""
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    try:
        ids, labels = encode_conversation(tokenizer, settings.template, turns, system)
    except TemplateMismatch as e:
        raise DataError("template_mismatch", str(e), *source) from None
    except UserError as e:
        raise DataError("bad_role_order", str(e), *source) from None
    ids, labels = _expand_context(ids, labels, context_id, [c * settings.tokens_per_tile for c in num_tiles], source)
    ids, labels, cut = _truncate(ids, labels, settings, end_id, source)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError("no_trained_tokens", "no answer token is left to train on (the official code would train "
                        "this sample with a zero loss)", *source)
    return ids, labels, cut


def _cached_check(path: str, settings: EncodeSettings, source, cache: dict | None) -> ImageCheck:
    if cache is None:
        return check_image(path, settings.max_image_pixels, source, settings)
    hit = cache.get(path)
    if hit is None:
        try:
            hit = check_image(path, settings.max_image_pixels, source, settings)
        except DataError as e:
            hit = e
        cache[path] = hit
    if isinstance(hit, DataError):
        raise DataError(hit.kind, hit.detail, *source)
    return hit
