"""A synthetic visual task for the demo and the tests: coloured shapes drawn with PIL.

Questions ask for the colour of the shape in one image, or of the one shape found in two images (the
other image is empty, and it is the first or the second at random); a few pure-text samples are mixed
into training. Every answer is one word out of four, so chance is 0.25.
Shapes, sizes, positions, backgrounds and image sizes vary (wide and tall images are tiled), so the
answer has to be read from the image(s). Shape questions, and questions that name an image by its
position, are deliberately left out: a tiny frozen random model does not learn them reliably within a
minutes-long CPU demo (measured: about 50 % after 1,000 steps). The generator is seeded: the same arguments give the same files.
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
MULTI_Q = "Image-1: <image>\nImage-2: <image>\nOne of the images shows a shape. What color is it?"


def vocabulary() -> list[str]:
    """Strings the demo tokenizer should know well."""
    return [COLOR_Q, SHAPE_Q, MULTI_Q,
            *COLORS, *SHAPES, *[q for q, _ in TEXT_ONLY], *[a for _, a in TEXT_ONLY]]


def draw_shape(rng: random.Random, color: str | None, shape: str, size: tuple[int, int]) -> Image.Image:
    """A shape on a light plain background. No shape when color is None: then a faint grey diagonal, so that
    the image is not one flat colour (which `data check` rightly reports as a blank image)."""
    w, h = size
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", size, bg)
    if color is None:
        ImageDraw.Draw(img).line([(0, 0), (w - 1, h - 1)], fill=tuple(c - 12 for c in bg), width=2)
        return img
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


def _sample(rng: random.Random, k: int, img_dir: Path, rel: str, tile: int, allow_text: bool,
            answer: str | None = None) -> dict:
    """One record; `answer` fixes the colour that is asked about (the held-out split is balanced)."""
    kind = rng.random()
    if allow_text and kind < 0.05:
        q, a = TEXT_ONLY[rng.randrange(len(TEXT_ONLY))]
        return {"id": k, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}

    def new_image(tag: str, color: str | None = None, square: bool = False, empty: bool = False) -> tuple[str, str, str]:
        color, shape = (None if empty else color or rng.choice(list(COLORS))), rng.choice(SHAPES)
        sizes = [(tile, tile)] if square else [(tile, tile), (tile, tile), (tile, tile), (2 * tile, tile), (tile, 2 * tile)]
        size = rng.choice(sizes)
        name = f"{k:05d}_{tag}.png"
        draw_shape(rng, color, shape, size).save(img_dir / name)
        return f"{rel}/{name}", color, shape

    if kind < 0.45:
        first = rng.random() < 0.5
        (p1, c1, _) = new_image("a", answer, empty=not first)
        (p2, c2, _) = new_image("b", answer, empty=first)
        return {"id": k, "image": [p1, p2], "conversations": [
            {"from": "human", "value": MULTI_Q}, {"from": "gpt", "value": c1 if first else c2}]}
    path, color, _ = new_image("a", answer)
    q, a = COLOR_Q, color
    # The official format: a single-image sample may omit "<image>"; it is put in front of the question.
    value = q if rng.random() < 0.5 else "<image>\n" + q
    return {"id": k, "image": path, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": a}]}


def make_dataset(out_dir: str | Path, n_train: int = 1600, n_heldout: int = 100, tile: int = 64, seed: int = 0) -> Path:
    """Write the dataset; the held-out answers are balanced over the colours, so any constant answer
    (what a model that cannot see would give) scores exactly chance."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colors = list(COLORS)
    for split, n, held, offset in (("train", n_train, False, 0), ("heldout", n_heldout, True, 100_000)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for k in range(n):
                record = _sample(rng, offset + k, out / "images", "images", tile, allow_text=not held,
                                 answer=colors[k % len(colors)] if held else None)
                f.write(json.dumps(record) + "\n")
    (out / "meta.json").write_text(json.dumps({
        "shapes": {"root": ".", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1,
                   "max_dynamic_patch": 6},
    }, indent=2) + "\n")
    (out / "heldout_meta.json").write_text(json.dumps({
        "shapes_heldout": {"root": ".", "annotation": "heldout.jsonl", "data_augment": False, "repeat_time": 1},
    }, indent=2) + "\n")
    return out


def preference_pair(record: dict, rng: random.Random) -> dict:
    """The official preference format of one record: the same question and media, its answer as `chosen`
    and another answer of the same kind (another colour, another text answer) as `rejected`."""
    question, chosen = record["conversations"][0]["value"], record["conversations"][1]["value"]
    if chosen in COLORS:
        rejected = rng.choice([c for c in COLORS if c != chosen])
    else:
        rejected = rng.choice([a for _, a in TEXT_ONLY if a != chosen])
    pair = {k: v for k, v in record.items() if k != "conversations"}
    return {**pair, "question": question, "chosen": chosen, "rejected": rejected}


def make_preference_dataset(out_dir: str | Path, n_train: int = 800, n_heldout: int = 100, tile: int = 64,
                            seed: int = 0) -> Path:
    """The same task as preference pairs (question, chosen, rejected), in `train.jsonl` / `heldout.jsonl`
    with the same meta files as `make_dataset`. A model that cannot see ranks the pairs at chance (0.5)."""
    out = make_dataset(out_dir, n_train, n_heldout, tile, seed)
    rng = random.Random(seed + 1)
    for split in ("train", "heldout"):
        path = out / f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        path.write_text("".join(json.dumps(preference_pair(r, rng)) + "\n" for r in records), encoding="utf-8")
    return out
