"""Pixels: bit-identical to the official preprocessing by default, the opt-in fast resize within its
documented bound, and `data check` warnings (file:line, not errors) for images the official RGB
conversion blanks, strips of transparency or leaves sideways; the opt-in fixes change the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from internvl_lora.data.audit import WARNING_KINDS, audit, format_report
from internvl_lora.data.encode import EncodeSettings, encode_record, image_tiles
from internvl_lora.data.images import check_image
from internvl_lora.data.meta import DatasetSpec, Line, load_meta
from internvl_lora.data.records import parse_record
from internvl_lora.internvl.templates import get_template

Q = {"from": "human", "value": "<image>\nWhat is it?"}
A = {"from": "gpt", "value": "A picture."}
# Worst difference of data.fast_resize from the official pixels, in /255 (docs/data.md): sharp edges
# upscaled (PIL rounds to uint8 between its two passes, torch does not); photo-like images stay within 4.
FAST_WORST, FAST_WORST_PHOTO = 27, 4


@pytest.fixture(scope="module")
def tok():
    from internvl_lora.internvl.tiny import build_tokenizer

    return build_tokenizer()


def settings(**kw) -> EncodeSettings:
    base = dict(template=get_template("internvl2_5"), tile_size=64, tokens_per_tile=16, max_dynamic_patch=6,
                max_length=8192)
    base.update(kw)
    return EncodeSettings(**base)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour field plus sensor-like noise."""
    r = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(r.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
    return Image.fromarray((base.astype(np.int16) + r.normal(0, 12, (h, w, 3)).astype(np.int16)).clip(0, 255)
                           .astype(np.uint8))


def text(w: int, h: int, seed: int = 0) -> Image.Image:
    """Black glyphs and hairlines on white: the sharpest edges a document has."""
    r = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for _ in range(max(4, h // 12)):
        d.text((int(r.integers(0, max(1, w - 40))), int(r.integers(0, h))), "Total 0123 |||", fill=(0, 0, 0))
    for _ in range(6):
        d.line([tuple(int(v) for v in r.integers(0, (w, h))), tuple(int(v) for v in r.integers(0, (w, h)))],
               fill=(0, 0, 0), width=1)
    return img


def record(path: Path, line: int = 1):
    root = path.parent
    obj = {"image": path.name, "conversations": [Q, A]}
    return parse_record(Line(0, DatasetSpec("t", str(root), str(root / "t.jsonl")), str(root / "t.jsonl"), line,
                             json.dumps(obj)))


# (size, tile size, max_num): downscale and upscale, 16:9 at the real 448 px, several grids, max_num=1
CASES = [((1920, 1080), 448, 6), ((800, 600), 64, 6), ((300, 1000), 64, 6), ((100, 80), 64, 12),
         ((37, 451), 64, 6), ((250, 40), 64, 1), ((30, 20), 64, 6)]


@pytest.mark.parametrize("kind", [photo, text])
@pytest.mark.parametrize("size, tile, max_num", CASES)
def test_default_pixels_are_bit_identical_to_the_official_code(tmp_path, tok, official_pixels, kind, size, tile,
                                                                max_num):
    path = tmp_path / "a.png"
    kind(*size).save(path)
    s = settings(tile_size=tile, max_dynamic_patch=max_num)
    enc = encode_record(record(path), tok, s)
    ref = official_pixels.image(path, tile, max_num)
    assert enc.num_tiles == [ref.shape[0]]
    assert torch.equal(enc.pixel_values, ref)


def test_a_jpeg_and_a_palette_png_are_bit_identical_too(tmp_path, tok, official_pixels):
    photo(640, 360).save(tmp_path / "a.jpg", quality=85)
    photo(200, 300).convert("P").save(tmp_path / "p.png")
    for name in ("a.jpg", "p.png"):
        enc = encode_record(record(tmp_path / name), tok, settings())
        assert torch.equal(enc.pixel_values, official_pixels.image(tmp_path / name, 64, 6)), name


@pytest.mark.parametrize("kind", [photo, text])
@pytest.mark.parametrize("size, tile, max_num", CASES)
def test_fast_resize_stays_within_the_documented_bound(tmp_path, kind, size, tile, max_num):
    path = tmp_path / "a.png"
    kind(*size).save(path)
    exact = torch.cat(image_tiles(str(path), settings(tile_size=tile, max_dynamic_patch=max_num), max_num, (str(path), 1)))
    fast = torch.cat(image_tiles(str(path), settings(tile_size=tile, max_dynamic_patch=max_num, fast_resize=True),
                                 max_num, (str(path), 1)))
    diff = (exact.int() - fast.int()).abs()
    assert int(diff.max()) <= (FAST_WORST_PHOTO if kind is photo else FAST_WORST)
    assert float(diff.float().mean()) < 0.5


# --------------------------------------------------------------------------------------------- warnings


def sixteen_bit_png(path: Path) -> Path:
    arr = np.linspace(300, 65000, 48 * 64).reshape(48, 64).astype(np.uint16)  # all above 255: clips to white
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def transparent_png(path: Path) -> Path:
    arr = np.zeros((48, 64, 4), np.uint8)  # transparent black around an opaque red square
    arr[12:36, 16:48] = (220, 20, 20, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    img = photo(96, 48)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


def write_meta(folder: Path, names: list[str]) -> Path:
    f = folder / "train.jsonl"
    f.write_text("".join(json.dumps({"image": n, "conversations": [Q, A]}) + "\n" for n in names))
    return f


def test_blank_transparent_and_rotated_images_warn_with_file_and_line_without_failing(tmp_path, tok):
    photo(64, 64).save(tmp_path / "ok.png")
    sixteen_bit_png(tmp_path / "deep.png")
    transparent_png(tmp_path / "alpha.png")
    rotated_jpeg(tmp_path / "turned.jpg")
    f = write_meta(tmp_path, ["ok.png", "deep.png", "alpha.png", "turned.jpg", "deep.png"])
    r = audit(load_meta(f), tok, settings())
    assert r.ok and r.valid == [0, 1, 2, 3, 4]  # warnings do not fail the audit
    got = [(w.kind, w.path, w.line) for w in r.warnings]
    assert got == [("blank_image", str(f), 2), ("alpha_dropped", str(f), 3), ("exif_rotated", str(f), 4),
                   ("blank_image", str(f), 5)]
    assert {k for k, _, _ in got} == set(WARNING_KINDS) - {"same_answers"}  # that one: tests/data/test_preference.py
    assert "deep.png" in r.warnings[0].message and "I;16" in r.warnings[0].message
    assert r.summary()["warnings_by_kind"] == {"blank_image": 2, "alpha_dropped": 1, "exif_rotated": 1}
    report = format_report(r)
    assert f"{f}:2: [blank_image]" in report and f"{f}:3: [alpha_dropped]" in report
    assert f"{f}:4: [exif_rotated]" in report and "with problems: 0" in report


def test_opt_in_settings_silence_the_warnings_they_fix(tmp_path, tok):
    transparent_png(tmp_path / "alpha.png")
    rotated_jpeg(tmp_path / "turned.jpg")
    f = write_meta(tmp_path, ["alpha.png", "turned.jpg"])
    r = audit(load_meta(f), tok, settings(alpha_background="white", exif_transpose=True))
    assert r.ok and r.warnings == []


def test_exif_transpose_turns_the_pixels_upright_and_the_audit_counts_the_turned_grid(tmp_path, tok, official_pixels):
    path = rotated_jpeg(tmp_path / "turned.jpg")  # stored 96x48, shown 48x96
    as_stored = encode_record(record(path), tok, settings())
    assert torch.equal(as_stored.pixel_values, official_pixels.image(path, 64, 6))  # default: official, sideways
    s = settings(exif_transpose=True)
    upright = encode_record(record(path), tok, s)
    ImageOps.exif_transpose(Image.open(path)).convert("RGB").save(tmp_path / "upright.png")
    assert torch.equal(upright.pixel_values, official_pixels.image(tmp_path / "upright.png", 64, 6))
    assert not torch.equal(upright.pixel_values, as_stored.pixel_values)
    # the audit sizes the image as training sees it (a 1x2 grid, not 2x1)
    assert check_image(str(path), s.max_image_pixels, (str(path), 1), s).size == (48, 96)
    assert check_image(str(path), s.max_image_pixels, (str(path), 1), settings()).size == (96, 48)


def test_alpha_background_white_composites_transparent_pixels_on_white(tmp_path, tok, official_pixels):
    path = transparent_png(tmp_path / "alpha.png")
    black = encode_record(record(path), tok, settings())
    assert torch.equal(black.pixel_values, official_pixels.image(path, 64, 6))  # default: official, black corners
    white = encode_record(record(path), tok, settings(alpha_background="white"))
    rgba = Image.open(path)
    on_white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    on_white.alpha_composite(rgba)
    on_white.convert("RGB").save(tmp_path / "white.png")
    assert torch.equal(white.pixel_values, official_pixels.image(tmp_path / "white.png", 64, 6))
    corner = white.pixel_values[0, :, 0, 0]
    assert torch.allclose(corner, official_pixels.transform(Image.new("RGB", (64, 64), "white"), 64,
                                                            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[:, 0, 0])


def test_alpha_background_must_be_null_or_white():
    from internvl_lora.errors import UserError

    with pytest.raises(UserError, match="alpha_background"):
        settings(alpha_background="green")
