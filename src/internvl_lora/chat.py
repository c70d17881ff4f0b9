"""Chat with a checkpoint: a merged model of either format, a base model, or an adapter folder.

    internvl-lora chat MODEL --image a.jpg "What is in the picture?"
    internvl-lora chat MODEL --image a.jpg --image b.jpg "Image-1: <image>\\nImage-2: <image>\\nCompare them."
    internvl-lora chat MODEL --video v.mp4 "What happens?"
    internvl-lora chat MODEL --image a.jpg          # interactive: one question per line

Greedy decoding by default, stopping at the template's stop token. Tiling settings come from the
adapter / merged folder (`internvl_lora.json`) so inference matches training. Only the answer goes to
stdout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.encode import EncodeSettings, IMAGE_BLOCK, open_image
from .errors import UserError
from .internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
from .internvl.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, VIDEO_PLACEHOLDER
from .internvl.templates import build_prompt, get_template
from .internvl.tiling import normalize_tiles, tile_image

RUN_META = "internvl_lora.json"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    settings: EncodeSettings
    device: str


def read_run_meta(path: Path) -> dict | None:
    f = path / RUN_META
    return json.loads(f.read_text()) if f.exists() else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_for_inference(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None,
                       base: str | Path | None = None) -> Loaded:
    """A model ready for generation. An adapter folder (adapter_config.json) is applied to its base."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    meta = read_run_meta(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = Path(base) if base else Path(meta["base_model"]) if meta else None
        if base_path is None:
            raise UserError(f"{path}: adapter folder without {RUN_META}; pass the base model with --base")
        info = inspect_checkpoint(base_path)
        model = load_model(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(path))
        tokenizer = load_tokenizer(base_path)
    else:
        info = inspect_checkpoint(path)
        model = load_model(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
    settings = EncodeSettings.from_checkpoint(info, template=meta["template"] if meta else None)
    if meta:  # the tiling used in training
        for k, v in meta.get("encode", {}).items():
            setattr(settings, k, v)
    model.to(device).eval()
    return Loaded(model, tokenizer, settings, device)


def image_tiles(paths: list[str], settings: EncodeSettings, blank: bool = False) -> tuple[list, list[int]]:
    """Tiles of the given images with the training tiling (the per-image budget split as in training)."""
    from .data.encode import tiles_budget

    budget = tiles_budget(settings, None, len(paths))
    tiles, counts = [], []
    for p in paths:
        img = open_image(p, settings.max_image_pixels, (p, 0))
        if blank:
            from PIL import Image

            img = Image.new("RGB", img.size, (255, 255, 255))
        t = (tile_image(img, settings.tile_size, budget, settings.min_dynamic_patch, settings.use_thumbnail)
             if settings.dynamic_image_size else [img])
        tiles += t
        counts.append(len(t))
    return tiles, counts


def build_inputs(question: str, images: list[str], settings: EncodeSettings, tokenizer,
                 history: list[tuple[str, str]] | None = None, system: str | None = None,
                 blank: bool = False, video_frames: list | None = None) -> tuple[list[int], torch.Tensor | None]:
    """Token ids and pixel values for one question, as the official `chat` builds them."""
    tiles, counts = [], []
    if video_frames is not None:
        from .data.video import frame_prompt

        prompt = frame_prompt(len(video_frames))
        question = question.replace(VIDEO_PLACEHOLDER + "\n", prompt, 1) if VIDEO_PLACEHOLDER in question \
            else prompt + question
        tiles, counts = list(video_frames), [1] * len(video_frames)
    elif images:
        n_placeholders = question.count(IMAGE_PLACEHOLDER)
        if n_placeholders == 0:
            question = (IMAGE_PLACEHOLDER + "\n") * len(images) + question if len(images) == 1 else "".join(
                f"Image-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(len(images))) + question
        elif n_placeholders != len(images):
            raise UserError(f"the question has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
        tiles, counts = image_tiles(images, settings, blank=blank)
    for _ in counts:
        question = question.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK, 1)
    prompt = build_prompt(settings.template, question, history, system)
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    out, k = [], 0
    for t in ids:
        if t == context_id:
            out.extend([context_id] * (counts[k] * settings.tokens_per_tile))
            k += 1
        else:
            out.append(t)
    pixels = normalize_tiles(tiles, settings.tile_size, settings.normalize_type) if tiles else None
    return out, pixels


@torch.no_grad()
def generate(loaded: Loaded, batch: list[tuple[list[int], torch.Tensor | None]], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers for a batch of (ids, pixels), left-padded."""
    tok, model = loaded.tokenizer, loaded.model
    stop_id = tok.convert_tokens_to_ids(loaded.settings.template.stop)
    longest = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(batch), longest), dtype=torch.long)
    for k, (ids, _) in enumerate(batch):
        input_ids[k, longest - len(ids):] = torch.tensor(ids)
        attention[k, longest - len(ids):] = 1
    pixels = [p for _, p in batch if p is not None]
    kwargs = {}
    if pixels:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        kwargs["pixel_values"] = torch.cat(pixels).to(loaded.device, dtype)
    out = model.generate(
        input_ids=input_ids.to(loaded.device), attention_mask=attention.to(loaded.device), **kwargs,
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_id, pad_token_id=tok.pad_token_id,
    )
    new = out[:, longest:]
    answers = []
    for row in new.tolist():
        if stop_id in row:
            row = row[: row.index(stop_id)]
        answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return answers


def chat_once(loaded: Loaded, question: str, images: list[str] | None = None, video: str | None = None,
              max_new_tokens: int = 256, history=None) -> str:
    frames = None
    if video:
        from .data.video import load_video

        s = loaded.settings
        frames = load_video(video, "middle", s.min_num_frames, s.max_num_frames)
    ids, pixels = build_inputs(question, images or [], loaded.settings, loaded.tokenizer, history=history,
                               video_frames=frames)
    return generate(loaded, [(ids, pixels)], max_new_tokens)[0]
