"""From records to model inputs (internvl_lora.data.encode): tiling per model config, image-token
expansion, truncation, video frames, image errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_lora.data.encode import EncodeSettings, encode_record, tiles_budget
from internvl_lora.data.meta import DatasetSpec, Line
from internvl_lora.data.records import parse_record
from internvl_lora.errors import DataError
from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer
from internvl_lora.internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, NORMALIZE
from internvl_lora.internvl.templates import get_template

A = {"from": "gpt", "value": "A red circle."}


@pytest.fixture(scope="module")
def demo(demo_folder):
    return demo_folder(8, 2)


@pytest.fixture(scope="module")
def tok(demo):
    return load_tokenizer(demo / "model")


def settings(**kw) -> EncodeSettings:
    base = dict(template=get_template("internvl2_5"), tile_size=64, tokens_per_tile=16, max_dynamic_patch=6,
                max_length=4096, jpeg_draft=False)
    base.update(kw)
    return EncodeSettings(**base)


def record(obj: dict, root: Path, line: int = 1, name: str = "t.jsonl"):
    return parse_record(Line(0, DatasetSpec("t", str(root), str(root / name)), str(root / name), line, json.dumps(obj)))


def image(path: Path, size, color=(200, 30, 30), fmt=None) -> str:
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[..., 2] = color[2]
    Image.fromarray(arr).save(path, format=fmt)
    return path.name


def q(text="What is it?"):
    return {"from": "human", "value": text}


def blocks(tok, ids) -> list[int]:
    """Context tokens per image block, checking every block is <img> ctx... </img>."""
    start, end, ctx = (tok.convert_tokens_to_ids(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
    out, k = [], 0
    while k < len(ids):
        if ids[k] == start:
            j = k + 1
            while ids[j] == ctx:
                j += 1
            assert ids[j] == end
            out.append(j - k - 1)
            k = j
        else:
            assert ids[k] not in (ctx, end)
        k += 1
    return out


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


# --------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("size, max_num, tiles", [
    # the official test vectors (spec §3.1), at 448 px
    ((448, 448), 12, 1), ((800, 600), 6, 7), ((1920, 1080), 6, 3), ((300, 1000), 6, 4),
    ((4000, 1000), 12, 5), ((896, 448), 12, 3), ((1000, 1000), 12, 10), ((500, 500), 12, 1),
])
def test_official_tile_counts_and_tokens(tmp_path, tok, size, max_num, tiles):
    name = image(tmp_path / "a.png", size)
    s = settings(tile_size=448, tokens_per_tile=256, max_dynamic_patch=max_num)
    enc = encode_record(record({"image": name, "conversations": [q(), A]}, tmp_path), tok, s)
    assert enc.num_tiles == [tiles]
    assert tuple(enc.pixel_values.shape) == (tiles, 3, 448, 448) and enc.pixel_values.dtype == torch.float32
    assert blocks(tok, enc.input_ids) == [256 * tiles]
    # the audit path counts the same without decoding the pixels
    assert encode_record(record({"image": name, "conversations": [q(), A]}, tmp_path), tok, s,
                         load_pixels=False).input_ids == enc.input_ids


@pytest.mark.parametrize("size", [(128, 64), (64, 192), (100, 100), (37, 451), (200, 120)])
def test_pixels_equal_the_official_ones_bit_for_bit(tmp_path, tok, official_pixels, size):
    """Default settings: the official path (PIL bicubic resize, crop, thumbnail, ToTensor, Normalize), exactly."""
    name = image(tmp_path / "a.png", size)
    enc = encode_record(record({"image": name, "conversations": [q(), A]}, tmp_path), tok, settings())
    assert torch.equal(enc.pixel_values, official_pixels.image(tmp_path / name, 64, 6))


@pytest.mark.parametrize("size", [(130, 70), (37, 451), (300, 200)])
def test_fast_resize_is_close_to_the_official_pixels(tmp_path, tok, official_pixels, size):
    w, h = size
    smooth = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h))
    smooth.save(tmp_path / "a.png")
    name = "a.png"
    rec = record({"image": name, "conversations": [q(), A]}, tmp_path)
    fast = encode_record(rec, tok, settings(fast_resize=True))
    ref = official_pixels.image(tmp_path / name, 64, 6)
    assert fast.pixel_values.shape == ref.shape
    # on a smooth picture a few /255 (docs/data.md: the worst case over varied images, sharp edges upscaled)
    assert 0 < float((fast.pixel_values - ref).abs().max()) <= 4 / 255 / 0.224


def test_data_augment_reencodes_the_official_tiles(tmp_path, tok, official_pixels):
    name = image(tmp_path / "a.png", (200, 120))
    rec = record({"image": name, "conversations": [q(), A]}, tmp_path)
    enc = encode_record(rec, tok, settings(), augment=True, rng=random.Random(7))
    draw = random.Random(7)
    qualities = [draw.randint(75, 100) for _ in range(enc.num_tiles[0])]
    assert torch.equal(enc.pixel_values, official_pixels.image(tmp_path / name, 64, 6, qualities=qualities))


def test_video_frames_are_the_official_single_tile(official_pixels):
    from internvl_lora.data.encode import frame_tile, normalize

    frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    ref = torch.stack([official_pixels.transform(t, 64, *NORMALIZE["imagenet"])
                       for t in official_pixels.dynamic_preprocess(frame, 1, 1, 64, True)])
    assert torch.equal(normalize([frame_tile(frame, 64)]), ref)
    assert not torch.equal(normalize([frame_tile(frame, 64, fast_resize=True)]), ref)


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale_with_close_pixels(tmp_path, tok):
    name = image(tmp_path / "a.jpg", (1920, 1080), fmt="JPEG")
    rec = record({"image": name, "conversations": [q(), A]}, tmp_path)
    exact = encode_record(rec, tok, settings(tile_size=448, tokens_per_tile=256))
    fast = encode_record(rec, tok, settings(tile_size=448, tokens_per_tile=256, jpeg_draft=True))
    assert fast.num_tiles == exact.num_tiles == [3] and fast.input_ids == exact.input_ids
    diff = (fast.pixel_values - exact.pixel_values).abs()
    assert 0 < float(diff.mean()) < 0.05  # about 1/255 on average: a reduced-scale decode, not a different image
    # PNGs have no reduced-scale decode: identical
    png = image(tmp_path / "b.png", (1920, 1080))
    rec = record({"image": png, "conversations": [q(), A]}, tmp_path)
    assert torch.equal(encode_record(rec, tok, settings(jpeg_draft=True)).pixel_values,
                       encode_record(rec, tok, settings()).pixel_values)


@pytest.mark.parametrize("kind", ["imagenet", "clip", "siglip"])
def test_normalization_type_from_the_checkpoint(tmp_path, demo, tok, kind):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo / "model", ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    proc = json.loads((ckpt / "preprocessor_config.json").read_text())
    proc["image_mean"], proc["image_std"] = NORMALIZE[kind]
    (ckpt / "preprocessor_config.json").write_text(json.dumps(proc))
    s = EncodeSettings.from_checkpoint(inspect_checkpoint(ckpt), jpeg_draft=False)
    assert s.normalize_type == kind
    Image.new("RGB", (64, 64), (255, 0, 51)).save(tmp_path / "c.png")
    enc = encode_record(record({"image": "c.png", "conversations": [q(), A]}, tmp_path), tok, s)
    mean, std = NORMALIZE[kind]
    want = [(v / 255 - m) / sd for v, m, sd in zip((255, 0, 51), mean, std)]
    got = enc.pixel_values[0].mean(dim=(1, 2)).tolist()
    assert got == pytest.approx(want, abs=1e-5)


def test_tile_size_tokens_per_tile_and_dynamic_size_from_the_checkpoint(tmp_path, demo, tok, official_pixels):
    info = inspect_checkpoint(demo / "model")
    s = EncodeSettings.from_checkpoint(info)
    assert (s.tile_size, s.tokens_per_tile, s.max_dynamic_patch, s.dynamic_image_size) == (64, 16, 6, True)
    name = image(tmp_path / "w.png", (128, 64))
    rec = record({"image": name, "conversations": [q(), A]}, tmp_path)
    enc = encode_record(rec, tok, s)
    assert enc.num_tiles == [3] and tuple(enc.pixel_values.shape) == (3, 3, 64, 64)
    assert blocks(tok, enc.input_ids) == [48]

    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo / "model", ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    proc = json.loads((ckpt / "preprocessor_config.json").read_text())
    proc["crop_to_patches"] = False
    (ckpt / "preprocessor_config.json").write_text(json.dumps(proc))
    s = EncodeSettings.from_checkpoint(inspect_checkpoint(ckpt), jpeg_draft=False)
    assert s.dynamic_image_size is False
    enc = encode_record(rec, tok, s)  # one tile: the whole image resized (official dynamic_image_size=False)
    assert enc.num_tiles == [1] and blocks(tok, enc.input_ids) == [16]
    ref = official_pixels.transform(Image.open(tmp_path / name).convert("RGB"), 64, *NORMALIZE["imagenet"])
    assert torch.equal(enc.pixel_values, ref[None])


def test_multi_image_tile_budget(tmp_path, tok):
    # square images with more than half the pixels of a 2x2 grid: (2, 2) + thumbnail when 4 tiles fit,
    # else one tile (official tie rule) -- so the count shows the per-image budget max(1, max_patch // n)
    names = [image(tmp_path / f"{k}.png", (160, 160)) for k in range(7)]
    for n, max_patch, per_image, tiles in ((1, 6, 6, 5), (2, 6, 3, 1), (2, 12, 6, 5), (3, 12, 4, 5),
                                           (4, 12, 3, 1), (7, 6, 1, 1)):
        assert tiles_budget(settings(max_dynamic_patch=max_patch), None, n) == per_image
        placeholders = "".join(f"Image-{k + 1}: <image>\n" for k in range(n))
        rec = record({"image": names[:n], "conversations": [q(placeholders + "Same?"), A]}, tmp_path)
        enc = encode_record(rec, tok, settings(max_dynamic_patch=max_patch), load_pixels=False)
        assert enc.num_tiles == [tiles] * n, (n, max_patch)
        assert blocks(tok, enc.input_ids) == [16 * tiles] * n


def test_dataset_max_dynamic_patch_overrides_the_global_one(tmp_path, tok):
    name = image(tmp_path / "a.png", (256, 64))  # 4:1
    rec = record({"image": name, "conversations": [q(), A]}, tmp_path)
    assert encode_record(rec, tok, settings(max_dynamic_patch=12), load_pixels=False).num_tiles == [5]
    assert encode_record(rec, tok, settings(max_dynamic_patch=12), dataset_max_patch=2, load_pixels=False).num_tiles == [3]
    assert encode_record(rec, tok, settings(max_dynamic_patch=12), dataset_max_patch=1, load_pixels=False).num_tiles == [1]


def test_image_blocks_follow_placeholder_order_and_tiles_follow_images(tmp_path, tok, official_pixels):
    a = image(tmp_path / "a.png", (64, 64))  # 1 tile
    b = image(tmp_path / "b.png", (128, 64))  # 2 + 1 tiles
    rec = record({"image": [b, a], "conversations": [q("First <image> then <image>, same?"), A]}, tmp_path)
    enc = encode_record(rec, tok, settings())
    assert enc.num_tiles == [3, 1] and blocks(tok, enc.input_ids) == [48, 16]
    ref = torch.cat([official_pixels.image(tmp_path / b, 64, 3), official_pixels.image(tmp_path / a, 64, 3)])
    assert torch.equal(enc.pixel_values, ref)


def test_pure_text_has_no_pixels_and_trains_the_answer(tmp_path, tok):
    enc = encode_record(record({"conversations": [q(), A, q("And?"), {"from": "gpt", "value": "Blue."}]}, tmp_path),
                        tok, settings())
    assert enc.pixel_values is None and enc.num_tiles == [] and blocks(tok, enc.input_ids) == []
    assert trained_text(tok, enc) == "A red circle.<|im_end|>Blue.<|im_end|>"


def test_system_turn_is_the_system_prompt(tmp_path, tok):
    rec = record({"image": image(tmp_path / "a.png", (64, 64)),
                  "conversations": [{"from": "system", "value": "Answer in one word."}, q(), A]}, tmp_path)
    text = tok.decode(encode_record(rec, tok, settings()).input_ids)
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n<img>")


# ------------------------------------------------------------------------------------------ truncation


def long_record(tmp_path, words_before: int, words_after: int):
    name = image(tmp_path / "a.png", (128, 64))  # 3 tiles, 48 context tokens
    text = "word " * words_before + "<image>\n" + "word " * words_after
    return record({"image": name, "conversations": [q(text), A]}, tmp_path)


def test_drop_is_the_default_and_reports_too_long(tmp_path, tok):
    rec = long_record(tmp_path, 0, 0)
    n = len(encode_record(rec, tok, settings(), load_pixels=False).input_ids)
    assert settings().truncation == "drop"
    encode_record(rec, tok, settings(max_length=n), load_pixels=False)
    with pytest.raises(DataError) as e:
        encode_record(rec, tok, settings(max_length=n - 1), load_pixels=False)
    assert e.value.kind == "too_long" and f"{n} tokens" in str(e.value) and e.value.line == 1


def test_cut_text_cuts_after_the_last_image_block_and_never_inside_it(tmp_path, tok):
    name = image(tmp_path / "a.png", (128, 64))  # 3 tiles, 48 context tokens
    rec = record({"image": name, "conversations": [q(), A, q("word " * 300), A]}, tmp_path)
    full = encode_record(rec, tok, settings(), load_pixels=False)
    end_pos = full.input_ids.index(tok.convert_tokens_to_ids(IMG_END_TOKEN))
    first_answer_end = full.labels.index(IGNORE_INDEX, next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX))
    # a limit in the second question: text is cut, the image block is whole, the cut is reported
    limit = first_answer_end + 20
    enc = encode_record(rec, tok, settings(max_length=limit, truncation="cut_text"))
    assert len(enc.input_ids) == limit and enc.cut == len(full.input_ids) - limit
    assert enc.input_ids == full.input_ids[:limit] and enc.labels == full.labels[:limit]
    assert blocks(tok, enc.input_ids) == [48] and enc.num_tiles == [3] and enc.pixel_values.shape[0] == 3
    assert trained_text(tok, enc) == "A red circle.<|im_end|>"

    # a cut that leaves no answer token: an error, never a silent zero loss
    single = long_record(tmp_path, 0, 300)
    one = encode_record(single, tok, settings(), load_pixels=False)
    limit = one.input_ids.index(tok.convert_tokens_to_ids(IMG_END_TOKEN)) + 20
    with pytest.raises(DataError) as e:
        encode_record(single, tok, settings(max_length=limit, truncation="cut_text"), load_pixels=False)
    assert e.value.kind == "no_trained_tokens"
    # a limit inside the image block: refused
    for limit in (end_pos, end_pos - 10, end_pos - 47):
        with pytest.raises(DataError) as e:
            encode_record(rec, tok, settings(max_length=limit, truncation="cut_text"), load_pixels=False)
        assert e.value.kind == "too_long" and "inside an image block" in str(e.value)


def test_cut_text_keeps_trained_tokens_when_the_cut_lands_in_a_later_answer(tmp_path, tok):
    name = image(tmp_path / "a.png", (64, 64))
    rec = record({"image": name, "conversations": [q(), A, q("More?"), {"from": "gpt", "value": "word " * 200}]}, tmp_path)
    full = encode_record(rec, tok, settings(), load_pixels=False)
    limit = len(full.input_ids) - 50
    enc = encode_record(rec, tok, settings(max_length=limit, truncation="cut_text"), load_pixels=False)
    assert enc.labels == full.labels[:limit] and enc.cut == 50
    assert trained_text(tok, enc).startswith("A red circle.<|im_end|>word word")


def test_bad_settings_are_user_errors():
    from internvl_lora.errors import UserError

    with pytest.raises(UserError, match="truncation"):
        settings(truncation="left")
    with pytest.raises(UserError, match="normalize_type"):
        settings(normalize_type="lab")


def test_template_mismatch_is_reported_not_raised(tmp_path, tok):
    rec = record({"conversations": [q("Say <|im_end|> now"), A]}, tmp_path, line=9)
    encode_record(rec, tok, settings())  # internvl2_5 trains it
    with pytest.raises(DataError) as e:
        encode_record(rec, tok, settings(template=get_template("Hermes-2")))
    assert e.value.kind == "template_mismatch" and e.value.line == 9


def test_labels_cover_exactly_the_answers(tmp_path, tok):
    rec = record({"image": image(tmp_path / "a.png", (64, 64)),
                  "conversations": [q(), {"from": "gpt", "value": "One"}, q("Two?"), {"from": "gpt", "value": "Two"}]},
                 tmp_path)
    enc = encode_record(rec, tok, settings())
    assert len(enc.labels) == len(enc.input_ids)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(enc.input_ids, enc.labels))
    assert trained_text(tok, enc) == "One<|im_end|>Two<|im_end|>"


# ----------------------------------------------------------------------------------------------- images


def test_image_problems_are_typed_with_file_and_line(tmp_path, tok):
    good = image(tmp_path / "good.jpg", (300, 200), fmt="JPEG")
    data = (tmp_path / good).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    png = bytearray((tmp_path / image(tmp_path / "ok.png", (100, 100))).read_bytes())
    png[120:180] = bytes(b ^ 0x55 for b in png[120:180])  # damaged compressed data
    (tmp_path / "corrupt.png").write_bytes(bytes(png))
    (tmp_path / "garbage.jpg").write_bytes(b"not an image" * 20)
    (tmp_path / "folder.png").mkdir()
    cases = {"nope.png": "missing_image", "corrupt.png": "corrupt_image", "garbage.jpg": "corrupt_image",
             "trunc.jpg": "truncated_image",
             "folder.png": "missing_image", good: "huge_image"}
    for name, kind in cases.items():
        rec = record({"image": name, "conversations": [q(), A]}, tmp_path, line=4)
        for load in (True, False):
            with pytest.raises(DataError) as e:
                encode_record(rec, tok, settings(max_image_pixels=300 * 200 - 1 if kind == "huge_image" else 10**8),
                              load_pixels=load)
            assert (e.value.kind, e.value.path, e.value.line) == (kind, str(tmp_path / "t.jsonl"), 4), (name, load)
            assert name in str(e.value)


def test_modes_other_than_rgb_are_converted(tmp_path, tok):
    Image.new("RGBA", (64, 64), (10, 20, 30, 0)).save(tmp_path / "a.png")
    Image.new("L", (64, 64), 128).save(tmp_path / "b.png")
    Image.new("P", (64, 64), 3).save(tmp_path / "c.gif")
    rec = record({"image": ["a.png", "b.png", "c.gif"], "conversations": [q("<image><image><image>"), A]}, tmp_path)
    enc = encode_record(rec, tok, settings())
    assert enc.num_tiles == [1, 1, 1] and enc.pixel_values.shape[1] == 3
    mean, std = NORMALIZE["imagenet"]
    assert enc.pixel_values[0, 0].mean().item() == pytest.approx((10 / 255 - mean[0]) / std[0], abs=1e-5)  # alpha dropped


# ------------------------------------------------------------------------------------------------ video


def clip_frames(n: int = 40):
    return [np.full((32, 48, 3), (i * 6) % 256, np.uint8) for i in range(n)]


def test_video_end_to_end(tmp_path, tok, write_video):
    write_video(tmp_path / "clip.mp4", clip_frames())
    rec = record({"video": "clip.mp4", "conversations": [q("What happens?"), A]}, tmp_path)
    s = settings(min_num_frames=3, max_num_frames=6)
    seen = set()
    for seed in range(8):
        enc = encode_record(rec, tok, s, rng=random.Random(seed))
        n = len(enc.num_tiles)
        assert 3 <= n <= 6 and enc.num_tiles == [1] * n
        seen.add(n)
        assert tuple(enc.pixel_values.shape) == (n, 3, 64, 64)
        assert blocks(tok, enc.input_ids) == [16] * n
        text = tok.decode(enc.input_ids)
        lines = "".join(f"Frame-{k}: <img>{'<IMG_CONTEXT>' * 16}</img>\n" for k in range(1, n + 1))
        assert "<|im_start|>user\n" + lines + "What happens?<|im_end|>" in text
        assert trained_text(tok, enc) == "A red circle.<|im_end|>"
        again = encode_record(rec, tok, s, rng=random.Random(seed))
        assert again.input_ids == enc.input_ids and torch.equal(again.pixel_values, enc.pixel_values)
    assert len(seen) > 1  # the frame count is drawn ('rand'), as in the official training code
    # frames are in temporal order: the grey level grows with the frame number
    levels = enc.pixel_values[:, 0].mean(dim=(1, 2))
    assert all(b >= a for a, b in zip(levels.tolist(), levels.tolist()[1:]))
    # the audit path counts the worst case, without decoding every frame
    assert len(encode_record(rec, tok, s, load_pixels=False).num_tiles) == 6
    # 'middle' with a fixed count: deterministic
    mid = settings(min_num_frames=4, max_num_frames=4, video_sample="middle")
    assert encode_record(rec, tok, mid, rng=random.Random(1)).input_ids == encode_record(rec, tok, mid, rng=random.Random(2)).input_ids


def test_video_problems(tmp_path, tok, write_video):
    write_video(tmp_path / "clip.mp4", clip_frames())
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 300)
    cases = [({"video": "nope.mp4"}, "missing_video"), ({"video": "garbage.mp4"}, "unreadable_video"),
             ({"video": "clip.mp4", "clip": [10, 12]}, "bad_clip")]
    for extra, kind in cases:
        rec = record({**extra, "conversations": [q(), A]}, tmp_path, line=3)
        for load in (True, False):
            with pytest.raises(DataError) as e:
                encode_record(rec, tok, settings(min_num_frames=2, max_num_frames=4), load_pixels=load)
            assert (e.value.kind, e.value.line) == (kind, 3), (extra, load)
            assert extra["video"] in str(e.value)
