"""From a validated record to model inputs: tiles, placeholder expansion, template, labels, truncation.

This is the official preprocessing (dataset.py `multi_modal_get_item` and friends) with these fixes:
a sample that does not fit is never silently replaced or given a zero loss — it is reported — a
truncation can never cut inside an image block, and a sample with no trained token is an error.

Pixels take a fast path (measured by bench/loader_bench.py, figures in docs/data.md): a JPEG that is
shrunk by 2x or more is decoded at reduced scale (`jpeg_draft`, libjpeg DCT scaling: about 1/255 mean
difference from a full decode); the bicubic resize runs in torch's uint8 antialiased kernel (PIL's
filter, a = -0.5, within 2/255 of PIL's output); tiles are views into the resized grid (no per-tile
crops) and normalization is one uint8->float copy plus one multiply-add. With `jpeg_draft=False` the
pixels are the official full-resolution path (decode, `resize` bicubic, crop, `ToTensor`,
`Normalize`) up to that resize rounding.
"""

from __future__ import annotations

import functools
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, UserError
from ..internvl.checkpoint import CheckpointInfo
from ..internvl.constants import (
    IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, NORMALIZE,
)
from ..internvl.templates import Template, TemplateMismatch, encode_conversation, get_template
from ..internvl.tiling import candidate_grids, closest_grid, jpeg_reencode
from .records import Record

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

    def __post_init__(self):
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


# --------------------------------------------------------------------------------------------------
# images


def _image_error(path: str, source, e: Exception, when: str) -> DataError:
    file, line = source
    text = str(e)
    if isinstance(e, Image.DecompressionBombError):
        return DataError("huge_image", f"{path}: {text}", file, line)
    if "image file is truncated" in text or "Truncated File Read" in text:
        return DataError("truncated_image", f"image {path} is truncated (the file ends too early): {text}", file, line)
    return DataError("corrupt_image", f"cannot {when} image {path}: {type(e).__name__}: {text}", file, line)


def open_image(path: str, max_pixels: int, source: tuple[str, int], decode: bool = True,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Open an image safely: a clear error for missing, unreadable, truncated or oversized files.

    `draft=(w, h)`: let a JPEG decoder scale down by a power of two while staying at least that big.
    With `decode` the image is loaded and in RGB mode.
    """
    file, line = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise DataError("missing_image", f"image not found: {path}", file, line) from None
    except IsADirectoryError:
        raise DataError("missing_image", f"{path} is a folder, not an image", file, line) from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise _image_error(path, source, e, "read") from None
    w, h = img.size
    if w < 1 or h < 1:
        img.close()
        raise DataError("corrupt_image", f"image {path} has size {w}x{h}", file, line)
    if w * h > max_pixels:
        img.close()
        raise DataError("huge_image", f"{path} is {w}x{h} pixels, above the limit of {max_pixels} "
                        "(data.max_image_pixels; a guard against decompression bombs)", file, line)
    return _decode(img, path, source, draft) if decode else img


def check_image(path: str, max_pixels: int, source: tuple[str, int]) -> tuple[int, int]:
    """Size of an image after a cheap but complete decode (JPEG draft mode at 1/8 scale)."""
    img = open_image(path, max_pixels, source, decode=False)
    w, h = img.size
    try:
        with img:
            if img.format == "JPEG":
                img.draft(None, (max(1, w // 8), max(1, h // 8)))
            img.load()
    except Exception as e:
        raise _image_error(path, source, e, "decode") from None
    return w, h


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


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) array -> (1, 3, H, W) uint8 tensor sharing its memory (channels-last layout)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays from PIL: never written to
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def resize_u8(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic resize of a (1, 3, H, W) uint8 tensor as PIL's `Image.resize(BICUBIC)` does it (antialiased
    when shrinking, a = -0.5); torch's uint8 kernel is ~5x faster and within 2/255 of PIL (mean < 0.01)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True)


def image_tiles(path: str, settings: EncodeSettings, max_num: int, source: tuple[str, int]) -> list[torch.Tensor]:
    """The tiles of one image, uint8 (k, 3, S, S) pieces (views, not copies): the grid row by row, row-major
    as the official crop order, then the thumbnail."""
    s = settings.tile_size
    img = open_image(path, settings.max_image_pixels, source, decode=False)
    cols, rows, thumb = tile_grid(*img.size, settings, max_num)
    gw, gh = cols * s, rows * s
    img = _decode(img, path, source, (gw, gh) if settings.jpeg_draft else None)
    x = _to_tensor(np.asarray(img))
    grid = resize_u8(x, gw, gh)[0]
    pieces = [grid[:, r * s:(r + 1) * s, :].unfold(2, s, s).permute(2, 0, 1, 3) for r in range(rows)]
    if thumb:
        pieces.append(resize_u8(x, s, s))
    return pieces


def _decode(img: Image.Image, path: str, source, draft: tuple[int, int] | None) -> Image.Image:
    """Load an opened image as RGB (official: `Image.open(path).convert("RGB")`, alpha dropped)."""
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as e:
        raise _image_error(path, source, e, "decode") from None
    return img


def frame_tile(frame: Image.Image, tile_size: int) -> torch.Tensor:
    """A video frame as one tile (official: `dynamic_preprocess(max_num=1)` = resize to S x S)."""
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    return resize_u8(_to_tensor(np.asarray(frame)), tile_size, tile_size)


def tile_images(pieces: list[torch.Tensor]) -> list[Image.Image]:
    """uint8 tile pieces -> one RGB PIL image per tile."""
    return [Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy())) for p in pieces for t in p]


def _augment(pieces: list[torch.Tensor], rng: random.Random) -> list[torch.Tensor]:
    """The official `data_augment`: every tile re-encoded as JPEG with quality drawn from 75..100."""
    return [_to_tensor(np.asarray(jpeg_reencode(t, rng))) for t in tile_images(pieces)]


@functools.lru_cache(maxsize=8)
def _affine(normalize_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in NORMALIZE[normalize_type])
    return 1.0 / (255.0 * std), -mean / std


def normalize(pieces: list[torch.Tensor], normalize_type: str = "imagenet") -> torch.Tensor:
    """uint8 (k, 3, S, S) pieces -> one float32 (n, 3, S, S) tensor: x / 255, then (x - mean) / std per
    channel (`ToTensor` + `Normalize`), in one gather-convert pass and one multiply-add pass."""
    n = sum(p.shape[0] for p in pieces)
    out = torch.empty((n, *pieces[0].shape[1:]), dtype=torch.float32)
    o = 0
    for p in pieces:
        out[o:o + p.shape[0]].copy_(p)
        o += p.shape[0]
    scale, shift = _affine(normalize_type)
    return out.mul_(scale).add_(shift)


def tiles_budget(settings: EncodeSettings, dataset_max_patch: int | None, n_images: int) -> int:
    """Max tiles per image: the dataset's (or global) max_dynamic_patch split over the images (official rule)."""
    max_patch = dataset_max_patch or settings.max_dynamic_patch
    return max(1, max_patch // n_images) if n_images > 1 else max_patch


# --------------------------------------------------------------------------------------------------
# video


def _video_error(e: DataError, source) -> DataError:
    where = f"{e.path}: " if e.path else ""
    return DataError(e.kind, where + e.detail, *source)


def probe_video(path: str, settings: EncodeSettings, clip, source: tuple[str, int]) -> int:
    """The largest number of frames training can draw from this video, checking that it can be read,
    without decoding every frame: a video file is demuxed to the end (packets counted) and its first
    frame decoded; a frame folder is listed and its first frame decoded; a GIF's frames are counted.

    'rand' and 'middle' draw T frames, T uniform in [min_num_frames, max_num_frames], and a video file
    or GIF is padded to T, so the worst case is max_num_frames; a frame folder gives min(frames, T).
    'fpsX' is deterministic: the exact count.
    """
    sample = settings.video_sample
    try:
        return _probe_video(path, settings, clip, source, sample)
    except DataError as e:
        raise _video_error(e if e.path else DataError(e.kind, e.detail, path=path), source) from None
    except ValueError as e:  # a bad sampling setting
        raise UserError(f"video sampling: {e}") from None


def _probe_video(path: str, settings: EncodeSettings, clip, source, sample: str) -> int:
    from . import video as V

    is_dir = os.path.isdir(path)
    if path.endswith(("/", os.sep)) or is_dir:
        if not is_dir:
            raise DataError("missing_video", "frame folder not found", path=path)
        try:
            names = [n for n in os.listdir(path) if not n.startswith(".") and n.lower().endswith(V.FRAME_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, n))]
        except OSError as e:
            raise DataError("unreadable_video", f"frame folder cannot be listed ({e.strerror or e})", path=path) from None
        if not names:
            raise DataError("unreadable_video", "frame folder holds no frame images", path=path)
        names = V.sort_frame_files(names)
        try:
            check_image(os.path.join(path, names[0]), settings.max_image_pixels, source)
        except DataError as e:
            raise DataError("unreadable_video", f"first frame {names[0]}: {e.detail}", path=path) from None
        vlen, fps, folder = len(names), V.FOLDER_FPS, True
    elif not os.path.exists(path):
        raise DataError("missing_video", "video file not found", path=path)
    elif path.lower().endswith(".gif"):
        vlen, fps = _probe_gif(path)
        folder = False
    else:
        vlen, fps = _probe_av(path)
        folder = False
    if sample.startswith("fps"):
        return len(V.get_frame_indices(None, vlen, sample, fps=fps, clip=clip, rng=0,
                                       min_num_frames=settings.min_num_frames,
                                       max_num_frames=settings.max_num_frames))
    idx = V.get_frame_indices(settings.max_num_frames, vlen, sample, fps=fps, clip=clip, rng=0,
                              min_num_frames=settings.min_num_frames, max_num_frames=settings.max_num_frames)
    if folder:
        _, window = V._clip_window(clip, vlen, fps)
        return min(window, settings.max_num_frames)
    return len(idx)


def _probe_gif(path: str) -> tuple[int, float | None]:
    from . import video as V

    try:
        with Image.open(path) as im:
            vlen = int(getattr(im, "n_frames", 1))
            total = 0
            for k in range(vlen):
                im.seek(k)
                d = im.info.get("duration") or 0
                total += d if d > 0 else V.GIF_DEFAULT_FRAME_MS
            im.seek(0)
            im.convert("RGB")
    except Exception as e:
        raise DataError("unreadable_video", f"GIF cannot be read ({type(e).__name__}: {e})", path=path) from None
    return vlen, (vlen / (total / 1000.0) if total else None)


def _probe_av(path: str) -> tuple[int, float | None]:
    from .video import _import_av

    av = _import_av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError("unreadable_video", "file has no video stream", path=path)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            packets, decoded = 0, False
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if not decoded and packets <= 64:
                    decoded = bool(packet.decode())
            if packets and not decoded:
                decoded = bool(stream.codec_context.decode(None))
    except DataError:
        raise
    except Exception as e:  # av.FFmpegError and friends: corrupt or unsupported file
        raise DataError("unreadable_video", f"video cannot be decoded ({type(e).__name__}: {e})", path=path) from None
    if packets == 0 or not decoded:
        raise DataError("unreadable_video", "video has no decodable frames", path=path)
    if not fps and stream.duration and stream.time_base:
        fps = packets / float(stream.duration * stream.time_base)
    return packets, fps


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
    rng = rng or random.Random(0)
    source = record.source
    turns = list(record.turns)
    pieces: list[torch.Tensor] = []
    counts: list[int] = []
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
                counts.append(count_tiles(*_cached_size(path, settings, source, size_cache), settings, budget))
        turns = expand_turns(turns, IMAGE_PLACEHOLDER, len(record.images))
    elif record.video:
        from .video import expand_video_placeholder, load_video

        if load_pixels:
            try:
                frames = load_video(record.video, settings.video_sample, settings.min_num_frames,
                                    settings.max_num_frames, clip=record.clip, rng=_numpy_rng(rng))
            except DataError as e:
                raise _video_error(e, source) from None
            except ValueError as e:
                raise UserError(f"video sampling: {e}") from None
            pieces = [frame_tile(f, settings.tile_size) for f in frames]
            n_frames = len(frames)
        elif video_frames is not None:
            n_frames = video_frames
        else:
            n_frames = probe_video(record.video, settings, record.clip, source)
        turns[0] = (turns[0][0], expand_video_placeholder(turns[0][1], n_frames))
        counts = [1] * n_frames
        turns = expand_turns(turns, IMAGE_PLACEHOLDER, n_frames)

    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    try:
        ids, labels = encode_conversation(tokenizer, settings.template, turns, record.system)
    except TemplateMismatch as e:
        raise DataError("template_mismatch", str(e), *source) from None
    except UserError as e:
        raise DataError("bad_role_order", str(e), *source) from None
    ids, labels = _expand_context(ids, labels, context_id, [c * settings.tokens_per_tile for c in counts], source)
    ids, labels, cut = _truncate(ids, labels, settings, end_id, source)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError("no_trained_tokens", "no answer token is left to train on (the official code would train "
                        "this sample with a zero loss)", *source)
    pixel_values, kept = None, None
    if pieces:
        pixel_values = normalize(pieces, settings.normalize_type)
        if keep_tiles:
            kept = tile_images(pieces)
    return Encoded(ids, labels, counts, pixel_values, kept, cut)


def _cached_size(path: str, settings: EncodeSettings, source, cache: dict | None) -> tuple[int, int]:
    if cache is None:
        return check_image(path, settings.max_image_pixels, source)
    hit = cache.get(path)
    if hit is None:
        try:
            hit = check_image(path, settings.max_image_pixels, source)
        except DataError as e:
            hit = e
        cache[path] = hit
    if isinstance(hit, DataError):
        raise DataError(hit.kind, hit.detail, *source)
    return hit
