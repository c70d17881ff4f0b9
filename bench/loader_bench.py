"""Data-loader throughput on one CPU core: 1080p JPEGs -> tiles (up to 6+1 at 448 px) + tokens.

    python bench/loader_bench.py                 # default: 20 synthetic 1920x1080 JPEGs, 3 passes
    python bench/loader_bench.py --jpeg-draft    # opt-in reduced-scale JPEG decode (faster, ~1/255 pixel difference)
    python bench/loader_bench.py --fast-resize   # opt-in torch uint8 resize (faster, not bit-identical)
    python bench/loader_bench.py --pixel-diff    # worst difference of --fast-resize from the official pixels
    python bench/loader_bench.py --size 1800x1200 --augment --profile

Each sample is one image with a question and an answer, encoded by `SupervisedDataset.__getitem__`
exactly as training does it (parse, decode, tile, normalize, template, tokenize, labels). Torch and
the tokenizer run on one thread. The tokenizer is the one of `--tokenizer DIR` (a checkpoint folder or
its tokenizer files; docs/data.md's figures use InternVL2_5-1B-MPO's, the real Qwen2 BPE of InternVL2.5),
else the tiny test tokenizer of `internvl_lora.internvl.tiny` (tokenization then costs less than for real).
Prints one JSON object: samples/s on one core by CPU time (`process_time`, robust to other load on
the machine) and by wall time, with the per-stage split when `--profile` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402



def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture: smooth colour field, shapes, lines, mild sensor noise (JPEG ~0.5 MB at 1080p)."""
    w, h = size
    r = np.random.default_rng(seed)
    img = Image.fromarray(r.integers(0, 255, (9, 16, 3)).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x, y, s = int(r.integers(0, w)), int(r.integers(0, h)), int(r.integers(20, 300))
        d.ellipse([x, y, x + s, y + int(s * 0.7)], fill=tuple(int(c) for c in r.integers(0, 255, 3)))
    for _ in range(30):
        d.line([(int(r.integers(0, w)), int(r.integers(0, h))), (int(r.integers(0, w)), int(r.integers(0, h)))],
               fill=tuple(int(c) for c in r.integers(0, 255, 3)), width=3)
    arr = np.asarray(img).astype(np.int16) + r.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_data(folder: Path, n: int, size: tuple[int, int]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for k in range(n):
            photo(k, size).save(folder / "images" / f"{k}.jpg", quality=90)
            f.write(json.dumps({"id": k, "image": f"images/{k}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the scene in this photograph in two sentences."},
                {"from": "gpt", "value": "A colourful abstract picture with overlapping ellipses and thin lines. "
                                         "The background shifts smoothly between several colours."}]}) + "\n")
    (folder / "meta.json").write_text(json.dumps({"bench": {
        "root": ".", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1, "max_dynamic_patch": 6}}))
    return folder / "meta.json"


def pixel_diff() -> dict:
    """Largest |fast_resize - official| uint8 difference over varied pictures and sizes (448-px tiles, max 6)."""
    from internvl_lora.internvl.tiling import candidate_grids, closest_grid, tile_pieces

    def text(seed, w, h):
        r = np.random.default_rng(seed)
        img = Image.new("RGB", (w, h), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for _ in range(max(4, h // 12)):
            d.text((int(r.integers(0, max(1, w - 50))), int(r.integers(0, h))), "Hello World 0123 |||", fill=(0, 0, 0))
        return img

    def checker(seed, w, h):
        x = (np.indices((h, w)).sum(0) % 2 * 255).astype(np.uint8)
        return Image.fromarray(np.stack([x, 255 - x, x], -1))

    def noise(seed, w, h):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

    out = {}
    for name, make in (("photo", lambda k, w, h: photo(k, (w, h))), ("text", text), ("checker", checker),
                       ("noise", noise)):
        worst = {"shrink": 0, "upscale": 0}
        for w, h in ((1920, 1080), (800, 600), (300, 1000), (100, 80), (37, 451), (4000, 1000), (1000, 1000),
                     (500, 500), (2000, 3000)):
            cols, rows = closest_grid(w, h, candidate_grids(1, 6), 448)
            img = make(1, w, h)
            a, b = (torch.cat(tile_pieces(img, cols, rows, 448, cols * rows > 1, fast=f)).int() for f in (False, True))
            key = "shrink" if w >= 448 * cols and h >= 448 * rows else "upscale"
            worst[key] = max(worst[key], int((a - b).abs().max()))
        out[name] = worst
    return out


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path), path
    from internvl_lora.internvl.tiny import build_tokenizer

    return build_tokenizer(), "tiny test tokenizer (no --tokenizer given)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--max-dynamic-patch", type=int, default=6)
    ap.add_argument("--jpeg-draft", action="store_true", help="reduced-scale JPEG decode (default off: the official full decode)")
    ap.add_argument("--fast-resize", action="store_true", help="torch uint8 resize (default off: PIL, the official pixels)")
    ap.add_argument("--pixel-diff", action="store_true", help="only measure --fast-resize against the official pixels")
    ap.add_argument("--augment", action="store_true", help="data_augment on (JPEG re-encode of every tile)")
    ap.add_argument("--tokenizer", metavar="DIR", default=None,
                    help="tokenizer folder (e.g. a checkpoint's); default: the tiny test tokenizer")
    ap.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    args = ap.parse_args(argv)
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        ap.error(f"--tokenizer {args.tokenizer}: not a folder")
    torch.set_num_threads(1)
    if args.pixel_diff:
        out = {"max_abs_diff_of_255": pixel_diff()}
        print(json.dumps(out))
        return out

    from internvl_lora.data.audit import audit
    from internvl_lora.data.dataset import SupervisedDataset
    from internvl_lora.data.encode import EncodeSettings
    from internvl_lora.data.meta import load_meta
    from internvl_lora.internvl.templates import get_template

    w, h = (int(x) for x in args.size.lower().split("x"))
    tokenizer, tok_name = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        meta = make_data(Path(tmp), args.images, (w, h))
        settings = EncodeSettings(template=get_template("internvl2_5"), tile_size=448, tokens_per_tile=256,
                                  max_dynamic_patch=args.max_dynamic_patch, max_length=16384,
                                  jpeg_draft=args.jpeg_draft, fast_resize=args.fast_resize)
        specs = load_meta(meta)
        if args.augment:
            for s in specs:
                s.data_augment = True
        result = audit(specs, tokenizer, settings)
        assert result.ok, result.problems
        ds = SupervisedDataset(result, tokenizer, settings, train=True, seed=0)
        first = ds[0]
        tiles = int(first["pixel_values"].shape[0])
        n = len(ds) * args.passes
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(args.passes):
            for i in range(len(ds)):
                ds[i]
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if profiler:
            import pstats

            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    out = {
        "image_size": f"{w}x{h}", "tiles_per_sample": tiles, "tokens_per_sample": int(first["input_ids"].numel()),
        "samples": n, "jpeg_draft": args.jpeg_draft, "fast_resize": args.fast_resize, "augment": args.augment,
        "samples_per_s_cpu": round(n / cpu, 1), "samples_per_s_wall": round(n / wall, 1),
        "tiles_per_s_cpu": round(n * tiles / cpu, 1),
        "ms_per_sample_cpu": round(cpu / n * 1000, 2), "tokenizer": tok_name,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
