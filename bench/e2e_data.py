"""Inputs of bench/e2e_bench.py: a real-format data set and random-weight InternVL -hf checkpoint folders.

    python bench/e2e_bench.py --make-data DIR --samples N [--image-scale 0.25]
    python bench/e2e_bench.py --make-model DIR --size 1b|8b|tiny --tokenizer TOKDIR

Data (PIL only, deterministic from --seed): the official meta.json + one JSONL file. Sample kinds, by share:
35 % one 1920x1080 photo-like JPEG (colour field, shapes, lines, sensor noise; quality 90), 20 % one
1240x1754 document page with rendered text lines (PNG or JPEG), 20 % two or three images (photos and
pages, `Image-k: <image>` lines), 15 % a short clip (a folder of 8-12 640x360 JPEG frames, or an 8-16 frame
GIF: both read without PyAV), 10 % text only. Questions of 8-40 words, answers of 32-512 tokens of
English words; a third of the image samples have a second turn.

Model: `InternVLForConditionalGeneration` at the shapes of bench/naive_lora_step.py (Qwen2.5 LLM of
InternVL3-1B / 8B, InternViT-300M at 448 px) with random weights in bf16, the vocabulary covering the
tokenizer of TOKDIR (copied in; `image_token_id` = its `<IMG_CONTEXT>`), and the preprocessor_config.json
of the -hf releases (max 12 tiles; the meta file's max_dynamic_patch 6 applies, as in the official recipe).
"""

from __future__ import annotations

import json
import random
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from loader_bench import photo

WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have not had but were "
    "has one all their there been if more when will would who so no time people year first new city between "
    "world after during state work school small right large number water image page table figure left above "
    "below colour shape line text value total report section market growth result light building street river "
    "person group shows three several around near front behind because however although therefore second "
    "document chart price increase decrease percent morning evening red blue green yellow white black round "
    "square bright dark open closed moving standing sitting holding scene view camera frame video clip motion"
).split()
TOKENS_PER_WORD = 1.25  # these words with spaces and punctuation, in the Qwen2 BPE
CLIP_SIZE = (640, 360)


def sentence(rng: random.Random, words: int) -> str:
    out, n = [], 0
    while n < words:
        k = min(words - n, rng.randint(6, 18))
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s[0].upper() + s[1:] + rng.choice("....?!"))
        n += k
    return " ".join(out)


def answer(rng: random.Random) -> str:
    return sentence(rng, max(1, round(rng.randint(32, 512) / TOKENS_PER_WORD)))


def page(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A document page: title, paragraphs of 9-11 pt-like text lines, a ruled table, margins."""
    w, h = size
    img = Image.new("RGB", (w, h), (250, 249, 245))
    d = ImageDraw.Draw(img)
    scale = w / 1240
    body = ImageFont.load_default(size=max(6, round(22 * scale)))
    title = ImageFont.load_default(size=max(8, round(40 * scale)))
    x0, y = round(100 * scale), round(110 * scale)
    d.text((x0, y), sentence(rng, 6)[:60], font=title, fill=(20, 20, 20))
    y += round(80 * scale)
    step = round(34 * scale)
    while y < h - 3 * x0:
        if rng.random() < 0.08:  # a small table
            rows, cols = rng.randint(3, 6), rng.randint(3, 5)
            cw = (w - 2 * x0) // cols
            for r in range(rows + 1):
                d.line([(x0, y + r * step), (x0 + cols * cw, y + r * step)], fill=(60, 60, 60), width=1)
            for r in range(rows):
                for c in range(cols):
                    d.text((x0 + c * cw + 6, y + r * step + 4), str(rng.randint(0, 99999)), font=body, fill=(30, 30, 30))
            y += (rows + 1) * step
            continue
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(9, 14)))
        d.text((x0, y), line, font=body, fill=(25, 25, 30))
        y += step + (step if rng.random() < 0.12 else 0)  # paragraph breaks
    return img


def scaled(size: tuple[int, int], s: float) -> tuple[int, int]:
    return max(32, round(size[0] * s)), max(32, round(size[1] * s))


def make_photo(root: Path, rel: str, seed: int, s: float) -> str:
    photo(seed, scaled((1920, 1080), s)).save(root / rel, quality=90)
    return rel


def make_page(root: Path, rel: str, rng: random.Random, s: float) -> str:
    img = page(rng, scaled((1240, 1754), s))
    if rel.endswith(".png"):
        img.save(root / rel)
    else:
        img.save(root / rel, quality=90)
    return rel


def clip_frames(seed: int, n: int, s: float) -> list[Image.Image]:
    """A pan across a photo-like picture with a moving disc: consecutive frames differ a little."""
    w, h = scaled(CLIP_SIZE, s)
    base = photo(seed, (w * 2, h))
    frames = []
    for i in range(n):
        x = round(i * w / max(1, n - 1))
        f = base.crop((x, 0, x + w, h))
        r = h // 6
        cx, cy = round(w * (0.2 + 0.6 * i / max(1, n - 1))), h // 2
        ImageDraw.Draw(f).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 40, 40))
        frames.append(f)
    return frames


def make_sample(args) -> dict:
    root, k, seed, s = args
    rng = random.Random(seed * 1_000_003 + k)
    u = rng.random()
    question = sentence(rng, rng.randint(8, 40))
    rec: dict = {"id": k}
    if u < 0.35:
        rec["image"] = make_photo(root, f"images/photo_{k}.jpg", seed * 100_000 + k, s)
        first = f"<image>\n{question}"
    elif u < 0.55:
        rec["image"] = make_page(root, f"images/page_{k}.{rng.choice(['png', 'jpg'])}", rng, s)
        first = f"<image>\n{question}"
    elif u < 0.75:
        names = []
        for j in range(rng.randint(2, 3)):
            names.append(make_photo(root, f"images/multi_{k}_{j}.jpg", seed * 100_000 + k * 7 + j, s)
                         if rng.random() < 0.6 else make_page(root, f"images/multi_{k}_{j}.jpg", rng, s))
        rec["image"] = names
        first = "".join(f"Image-{j + 1}: <image>\n" for j in range(len(names))) + question
    elif u < 0.9:
        if rng.random() < 0.5:
            frames = clip_frames(seed * 100_000 + k, rng.randint(8, 12), s)
            folder = root / f"videos/clip_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(frames):
                f.save(folder / f"frame_{i}.jpg", quality=90)
            rec["video"] = f"videos/clip_{k}/"
        else:
            frames = clip_frames(seed * 100_000 + k, rng.randint(8, 16), s)
            frames[0].save(root / f"videos/clip_{k}.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
            rec["video"] = f"videos/clip_{k}.gif"
        first = f"<video>\n{question}"
    else:
        first = question
    turns = [{"from": "human", "value": first}, {"from": "gpt", "value": answer(rng)}]
    if "image" in rec and rng.random() < 1 / 3:
        turns += [{"from": "human", "value": sentence(rng, rng.randint(6, 20))}, {"from": "gpt", "value": answer(rng)}]
    rec["conversations"] = turns
    return rec


def make_data(folder: str | Path, n: int, seed: int = 0, image_scale: float = 1.0, workers: int = 0) -> dict:
    """Write N samples under FOLDER (meta.json, train.jsonl, images/, videos/); returns the kinds' counts."""
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(root, k, seed, image_scale) for k in range(n)]
    if workers > 1:
        with Pool(workers) as pool:
            records = pool.map(make_sample, jobs, chunksize=4)
    else:
        records = [make_sample(j) for j in jobs]
    with open(root / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (root / "meta.json").write_text(json.dumps({"e2e_mixed": {
        "root": ".", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1, "max_dynamic_patch": 6,
        "length": n}}, indent=2) + "\n")
    kinds: dict = {}
    for r in records:
        kind = "video" if "video" in r else "multi_image" if isinstance(r.get("image"), list) else \
            "image" if "image" in r else "text"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def make_model(folder: str | Path, size: str, tokenizer_dir: str | Path, device: str = "cpu") -> dict:
    """Save a random-weight -hf checkpoint folder at the SIZE shape with the tokenizer of TOKENIZER_DIR."""
    import torch
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration

    from internvl_lora.internvl.format.config_map import preprocessor_config
    from naive_lora_step import LLM, VIT_TINY

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    llm = dict(LLM[size])
    need = len(tok)
    if llm["vocab_size"] < need:  # tiny: its 2,000-token vocabulary grows to the real tokenizer's
        llm["vocab_size"] = (need + 63) // 64 * 64
    image_token = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    vit = dict(VIT_TINY, image_size=448, patch_size=14) if size == "tiny" else {}
    cfg = InternVLConfig(vision_config=vit, text_config=dict(
        model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id, **llm),
        image_token_id=image_token, tie_word_embeddings=llm["tie_word_embeddings"])
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    settings = preprocessor_config({"force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
                                    "dynamic_image_size": True})
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    del model
    size_gb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e9
    return {"model": str(out), "size": size, "params": params, "vocab_size": llm["vocab_size"],
            "image_token_id": image_token, "tokenizer_len": need, "disk_gb": round(size_gb, 2)}

