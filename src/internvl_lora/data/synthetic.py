"""A synthetic visual task for the demo and the tests: coloured shapes drawn with PIL.

Questions ask for the colour of the shape in one image, or in the first or second of two images; a
few pure-text samples are mixed into training. Every answer is one word out of four, so chance is 0.25.
Shapes, sizes, positions, backgrounds and image sizes vary (wide and tall images are tiled), so the
answer has to be read from the image. Shape questions are deliberately left out: a tiny frozen
random vision tower does not separate shapes well enough for a minutes-long CPU demo. The generator is seeded: the same arguments give the same files.
Output: `images/`, `train.jsonl`, `heldout.jsonl`, `meta.json` (train) and `heldout_meta.json`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ["circle", "square", "triangle", "cross"]
TEXT_ONLY = [("Say hello.", "hello"), ("What is the opposite of up?", "down"), ("Say yes.", "yes")]

COLOR_Q = "What color is the shape?"
SHAPE_Q = "What shape is this?"
MULTI_Q = "Image-1: <image>\nImage-2: <image>\nWhat color is the shape in the {which} image?"


def vocabulary() -> list[str]:
    """Strings the demo tokenizer should know well."""
    return [COLOR_Q, SHAPE_Q, MULTI_Q.format(which="first"), MULTI_Q.format(which="second"),
            *COLORS, *SHAPES, *[q for q, _ in TEXT_ONLY], *[a for _, a in TEXT_ONLY]]


def draw_shape(rng: random.Random, color: str, shape: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    s = rng.randint(int(min(w, h) * 0.55), int(min(w, h) * 0.85))
    x0, y0 = rng.randint(0, w - s), rng.randint(0, h - s)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
    else:
        t = s // 3
        d.rectangle([x0 + t, y0, x0 + 2 * t, y0 + s], fill=fill)
        d.rectangle([x0, y0 + t, x0 + s, y0 + 2 * t], fill=fill)
    return img


def _sample(rng: random.Random, k: int, img_dir: Path, rel: str, tile: int, allow_text: bool) -> dict:
    kind = rng.random()
    if allow_text and kind < 0.05:
        q, a = TEXT_ONLY[rng.randrange(len(TEXT_ONLY))]
        return {"id": k, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}

    def new_image(tag: str) -> tuple[str, str, str]:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        size = rng.choice([(tile, tile), (tile, tile), (tile, tile), (2 * tile, tile), (tile, 2 * tile)])
        name = f"{k:05d}_{tag}.png"
        draw_shape(rng, color, shape, size).save(img_dir / name)
        return f"{rel}/{name}", color, shape

    if kind < 0.45:
        (p1, c1, _), (p2, c2, _) = new_image("a"), new_image("b")
        which = rng.choice(["first", "second"])
        return {"id": k, "image": [p1, p2], "conversations": [
            {"from": "human", "value": MULTI_Q.format(which=which)},
            {"from": "gpt", "value": c1 if which == "first" else c2}]}
    path, color, _ = new_image("a")
    q, a = COLOR_Q, color
    # The official format: a single-image sample may omit "<image>"; it is put in front of the question.
    value = q if rng.random() < 0.5 else "<image>\n" + q
    return {"id": k, "image": path, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": a}]}


def make_dataset(out_dir: str | Path, n_train: int = 600, n_heldout: int = 60, tile: int = 64, seed: int = 0) -> Path:
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n, allow_text, offset in (("train", n_train, True, 0), ("heldout", n_heldout, False, 100_000)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for k in range(n):
                f.write(json.dumps(_sample(rng, offset + k, out / "images", "images", tile, allow_text)) + "\n")
    (out / "meta.json").write_text(json.dumps({
        "shapes": {"root": ".", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1,
                   "max_dynamic_patch": 6},
    }, indent=2) + "\n")
    (out / "heldout_meta.json").write_text(json.dumps({
        "shapes_heldout": {"root": ".", "annotation": "heldout.jsonl", "data_augment": False, "repeat_time": 1},
    }, indent=2) + "\n")
    return out
