"""Inference core: load a checkpoint for generation, build its inputs, generate greedy answers.

Used by `chat`, `merge` (parity check), `validate` and the generation metric during training.
`load_for_inference` takes a merged model of either format, a base model, or an adapter folder (applied
to its base); tiling and template come from the run (`internvl_lora.json`) so inference matches training.
`build_inputs` places the `<image>` placeholders and expands them as the official `model.chat` does;
`generate` decodes greedily, batched with left padding, and stops at the template's stop token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.encode import IMAGE_BLOCK, EncodeSettings, frame_tile, normalize
from .errors import UserError
from .internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
from .internvl.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, VIDEO_PLACEHOLDER
from .internvl.templates import build_prompt, parse_response
from .run_dir import RUN_META, adapter_run_meta, check_base_fingerprint, parse_dtype, read_run_meta

# Frames taken from a video when the run recorded no frame count (the official video demo's 8).
VIDEO_FRAMES = 8


@dataclass
class Loaded:
    model: object
    tokenizer: object
    settings: EncodeSettings
    device: str
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


@contextlib.contextmanager
def quiet_loading():
    """Load without transformers' progress bars (its warnings still reach stderr)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def settings_for(info, meta: dict | None) -> EncodeSettings:
    """The checkpoint's encode settings, overridden by the ones the run trained with (tiling, template)."""
    settings = EncodeSettings.from_checkpoint(info, template=(meta or {}).get("template"))
    for k, v in (meta or {}).get("encode", {}).items():
        if hasattr(settings, k):
            setattr(settings, k, v)
    return settings


def load_for_inference(path: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None,
                       base: str | Path | None = None) -> Loaded:
    """A model ready for generation. An adapter folder (adapter_config.json) is applied to its base."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    device = device or default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    adapter = (path / "adapter_config.json").exists()
    meta = (adapter_run_meta(path) if adapter else read_run_meta(path)) or {}
    with quiet_loading():
        if adapter:
            from .internvl.format.adapter_check import apply_adapter, check_adapter_files

            check_adapter_files(path)  # a damaged adapter is named before the base is loaded
            base_path = Path(base) if base else Path(meta["base_model"]) if meta.get("base_model") else None
            if base_path is None:
                raise UserError(f"{path}: adapter folder without {RUN_META}; pass the base model with --base")
            if not base_path.exists():
                raise UserError(f"{path}: its base model {base_path} does not exist; pass the base model with --base")
            check_base_fingerprint(meta, base_path, given=bool(base))
            info = inspect_checkpoint(base_path)
            model = apply_adapter(load_model(base_path, dtype=dtype), path)
            tokenizer = load_tokenizer(base_path)
        else:
            info = inspect_checkpoint(path)
            model = load_model(path, dtype=dtype)
            tokenizer = load_tokenizer(path)
    settings = settings_for(info, meta)
    model.to(device).eval()
    return Loaded(model, tokenizer, settings, device, str(path), meta)


# --------------------------------------------------------------------------------------------------
# Prompt building
# --------------------------------------------------------------------------------------------------


def image_tiles(paths: list[str], settings: EncodeSettings, blank: bool = False) -> tuple[list, list[int]]:
    """uint8 tile pieces of the given images, through the same code as training (`data.encode.image_tiles`:
    same grid, same resize kernel, same budget split over several images), and the tile count per image.
    `blank` replaces every pixel by white (to check that answers depend on the images)."""
    from .data.encode import image_tiles as encode_tiles
    from .data.encode import tiles_budget

    budget = tiles_budget(settings, None, len(paths))
    pieces, counts = [], []
    for p in paths:
        these = encode_tiles(p, settings, budget, (None, None))  # no fake file:line; dynamic_image_size off: one whole-image tile, as in training
        if blank:
            these = [torch.full_like(t, 255) for t in these]
        pieces += these
        counts.append(sum(t.shape[0] for t in these))
    return pieces, counts


def place_placeholders(question: str, history: list[tuple[str, str]] | None, n_images: int,
                       n_frames: int | None = None) -> tuple[str, list[tuple[str, str]]]:
    """Put the `<image>` placeholders where the official chat puts them, counting those already in the
    history: a conversation whose text has none gets them in front of its first question
    (`<image>\\n` for one image, `Image-k: <image>\\n` lines for several, `Frame-k: <image>\\n` for video)."""
    history = list(history or [])
    texts = [q for q, _ in history] + [question]
    present = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if n_frames is not None:
        if present == 0 or VIDEO_PLACEHOLDER in texts[0]:
            from .data.video import expand_video_placeholder

            texts[0] = expand_video_placeholder(texts[0], n_frames)
        wanted, what = n_frames, "video frame(s)"
    else:
        if n_images and present == 0:
            texts[0] = (IMAGE_PLACEHOLDER + "\n" if n_images == 1 else "".join(
                f"Image-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(n_images))) + texts[0]
        wanted, what = n_images, "image(s)"
    found = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if found != wanted:
        raise UserError(f"the conversation has {found} {IMAGE_PLACEHOLDER} placeholder(s) for {wanted} {what}")
    history = [(q, a) for q, (_, a) in zip(texts[:-1], history)]
    return texts[-1], history


def encode_prompt(question: str, history: list[tuple[str, str]], counts: list[int], settings: EncodeSettings,
                  tokenizer, system: str | None = None) -> list[int]:
    """Token ids of a prompt whose placeholders are already placed: each `<image>` becomes
    `<img>` + tiles x tokens_per_tile `<IMG_CONTEXT>` + `</img>`, in order over history and question."""
    k = 0

    def expand(text: str) -> str:
        nonlocal k
        while IMAGE_PLACEHOLDER in text and k < len(counts):
            text = text.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK, 1)
            k += 1
        return text

    history = [(expand(q), a) for q, a in history]
    question = expand(question)
    prompt = build_prompt(settings.template, question, history, system)
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    out, n = [], 0
    for t in ids:
        if t == context_id:
            if n >= len(counts):
                raise UserError(f"the text itself contains {IMG_CONTEXT_TOKEN}; remove it from the question")
            out.extend([context_id] * (counts[n] * settings.tokens_per_tile))
            n += 1
        else:
            out.append(t)
    if n != len(counts):
        raise UserError(f"{len(counts)} image(s) but {n} image block(s) in the prompt")
    return out


def load_frames(video: str, settings: EncodeSettings, clip=None, num_frames: int | None = None) -> list:
    """Deterministic frames for inference: `num_frames` (default 8, within the run's frame range) at the
    middle of equal segments, as the official video demo samples them."""
    from .data.video import load_video

    n = num_frames or min(max(settings.min_num_frames, VIDEO_FRAMES), settings.max_num_frames)
    return load_video(video, "middle", settings.min_num_frames, settings.max_num_frames, clip=clip, num_frames=n)


def build_inputs(question: str, images: list[str], settings: EncodeSettings, tokenizer,
                 history: list[tuple[str, str]] | None = None, system: str | None = None,
                 blank: bool = False, video_frames: list | None = None) -> tuple[list[int], torch.Tensor | None]:
    """Token ids and pixel values for one question (with its history), as the official `chat` builds them."""
    if video_frames is not None:
        tiles, counts = [frame_tile(f, settings.tile_size, settings.fast_resize) for f in video_frames], [1] * len(video_frames)
    elif images:
        tiles, counts = image_tiles(images, settings, blank=blank)
    else:
        tiles, counts = [], []
    question, history = place_placeholders(question, history, len(images or []),
                                           len(video_frames) if video_frames is not None else None)
    ids = encode_prompt(question, history, counts, settings, tokenizer, system)
    pixels = normalize(tiles, settings.normalize_type) if tiles else None
    return ids, pixels


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def stop_ids(loaded: Loaded) -> list[int]:
    tok = loaded.tokenizer
    stop = tok.convert_tokens_to_ids(loaded.settings.template.stop)
    if stop is None or stop == tok.unk_token_id:
        raise UserError(f"the tokenizer has no {loaded.settings.template.stop!r} token, the stop token of template "
                        f"{loaded.settings.template.name!r}; is the template right?")
    return [stop]


def decode_answer(loaded: Loaded, row: list[int], stops: list[int]) -> str:
    """The answer of one generated row: cut at the first stop token, decoded as `model.chat` does."""
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    row = row[:cut]
    template = loaded.settings.template
    if template.answer_prefix:  # GPT-OSS: keep special tokens, drop the channel header the model writes
        return parse_response(template, loaded.tokenizer.decode(row, skip_special_tokens=False))
    return loaded.tokenizer.decode(row, skip_special_tokens=True).strip()


@torch.no_grad()
def generate(loaded: Loaded, batch: list[tuple[list[int], torch.Tensor | None]], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers for a batch of (ids, pixels), left-padded, stopping at the template's stop token."""
    tok, model = loaded.tokenizer, loaded.model
    stops = stop_ids(loaded)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    longest = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), longest), dtype=torch.long)
    for k, (ids, _) in enumerate(batch):
        input_ids[k, longest - len(ids):] = torch.tensor(ids)
        attention[k, longest - len(ids):] = 1
    pixels = [p for _, p in batch if p is not None]
    kwargs = {}
    if pixels:
        kwargs["pixel_values"] = torch.cat(pixels).to(loaded.device, loaded.dtype)
    out = model.generate(
        input_ids=input_ids.to(loaded.device), attention_mask=attention.to(loaded.device), **kwargs,
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
        eos_token_id=stops, pad_token_id=pad_id,
    )
    return [decode_answer(loaded, row, stops) for row in out[:, longest:].tolist()]
