"""`data inspect`: rendered prompt, trained spans, tiles; index selection; JSON; saved tiles; both checkpoint formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from internvl_lora.cli import app
from internvl_lora.data.encode import EncodeSettings, encode_record
from internvl_lora.data.inspect import inspect, parse_index, render
from internvl_lora.data.meta import load_meta, read_lines
from internvl_lora.data.records import parse_record
from internvl_lora.errors import UserError
from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer
from internvl_lora.internvl.constants import IGNORE_INDEX, NORMALIZE

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real"


@pytest.fixture(scope="module")
def demo(demo_folder, tmp_path_factory):
    """The demo model, and a meta file of two datasets (the second repeated) over hand-made records."""
    d = demo_folder(4, 2, copy_to=tmp_path_factory.mktemp("demo"))
    data = d / "mine"
    data.mkdir()
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :64] = (250, 10, 10)
    arr[:, 64:] = (10, 10, 250)
    Image.fromarray(arr).save(data / "wide.png")
    Image.new("RGB", (64, 64), (0, 200, 0)).save(data / "green.png")
    first = [
        {"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {"id": "w", "image": "wide.png", "conversations": [{"from": "human", "value": "Colors?"},
                                                           {"from": "gpt", "value": "red blue"}]},
        {"id": "bad", "image": "gone.png", "conversations": [{"from": "human", "value": "?"},
                                                             {"from": "gpt", "value": "x"}]},
    ]
    second = [{"id": "m", "image": ["green.png", "wide.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "green"}]}]
    (data / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    (data / "second.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in second))  # blank first line
    (data / "meta.json").write_text(json.dumps({
        "first": {"root": ".", "annotation": "first.jsonl", "data_augment": True, "repeat_time": 0.5},
        "second": {"root": ".", "annotation": "second.jsonl", "data_augment": False, "repeat_time": 3},
    }))
    return d


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.mark.parametrize("spec, n, want", [
    ("0", 5, [0]), ("4", 5, [4]), ("1:3", 5, [1, 2]), (":2", 5, [0, 1]), ("3:", 5, [3, 4]), ("2:99", 5, [2, 3, 4]),
    ("all", 3, [0, 1, 2]), (" 1 ", 5, [1]),
])
def test_parse_index(spec, n, want):
    assert parse_index(spec, n) == want


@pytest.mark.parametrize("spec", ["5", "-1", "x", "1:x", "3:1", "5:", "1-2", ""])
def test_parse_index_rejects(spec):
    with pytest.raises(UserError, match="index"):
        parse_index(spec, 5)


def test_indices_follow_meta_order_then_line_order_before_repeat(demo):
    out = cli("data", "inspect", demo / "mine" / "meta.json", "--model", demo / "model", "--index", "all", "--json")
    assert out.exit_code == 1  # one sample fails; it is reported, the others are shown
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    first, second = demo / "mine" / "first.jsonl", demo / "mine" / "second.jsonl"
    assert [(r["index"], r["source"]) for r in rows] == [
        (0, f"{first}:1"), (1, f"{first}:2"), (2, f"{first}:3"), (3, f"{second}:2")]
    assert rows[2]["kind"] == "missing_image" and "gone.png" in rows[2]["error"]
    assert [r.get("num_tiles") for r in rows] == [[], [3], None, [1, 3]]
    tok = load_tokenizer(demo / "model")
    settings = EncodeSettings.from_checkpoint(inspect_checkpoint(demo / "model"))
    lines = read_lines(load_meta(demo / "mine" / "meta.json"))
    for r in (rows[0], rows[1], rows[3]):
        enc = encode_record(parse_record(lines[r["index"]]), tok, settings)
        assert r["input_ids"] == enc.input_ids and r["labels"] == enc.labels  # not augmented
        assert len(r["input_ids"]) == len(r["labels"])


def test_text_output_shows_prompt_trained_spans_tokens_and_tiles(demo):
    out = cli("data", "inspect", demo / "mine" / "meta.json", "--model", demo / "model", "--index", "1:2")
    assert out.exit_code == 0, out.output
    head, body = out.stdout.split("\n", 1)
    tok = load_tokenizer(demo / "model")
    settings = EncodeSettings.from_checkpoint(inspect_checkpoint(demo / "model"))
    enc = encode_record(parse_record(read_lines(load_meta(demo / "mine" / "meta.json"))[1]), tok, settings)
    trained = sum(1 for x in enc.labels if x != IGNORE_INDEX)
    assert head == (f"# sample 1 ({demo / 'mine' / 'first.jsonl'}:2): {len(enc.input_ids)} tokens, {trained} trained, "
                    "tiles per image [3]")
    assert "<|im_start|>user\n<img><IMG_CONTEXT>x48</img>\nColors?<|im_end|>\n<|im_start|>assistant\n[[red blue<|im_end|>]]" in body
    assert "\033[" not in out.stdout  # no colour when not a terminal
    colored = render(tok, enc.input_ids, enc.labels, color=True)
    assert "\033[1;32mred blue<|im_end|>\033[0m" in colored


def test_save_tiles_writes_unnormalized_tiles_in_order(demo, tmp_path):
    out = cli("data", "inspect", demo / "mine" / "meta.json", "--model", demo / "model", "--index", "3",
              "--save-tiles", tmp_path / "tiles")
    assert out.exit_code == 0, out.output
    assert sorted(os.listdir(tmp_path / "tiles")) == [
        "s3_img0_tile0.png", "s3_img1_tile0.png", "s3_img1_tile1.png", "s3_img1_tile2.png"]
    tiles = {n: np.asarray(Image.open(tmp_path / "tiles" / n)) for n in os.listdir(tmp_path / "tiles")}
    assert all(t.shape == (64, 64, 3) for t in tiles.values())
    assert tuple(tiles["s3_img0_tile0.png"][32, 32]) == (0, 200, 0)
    assert tiles["s3_img1_tile0.png"][32, 20, 0] > 200 and tiles["s3_img1_tile1.png"][32, 40, 2] > 200  # red | blue
    # the saved tiles are what gets normalized
    tok = load_tokenizer(demo / "model")
    settings = EncodeSettings.from_checkpoint(inspect_checkpoint(demo / "model"))
    enc = encode_record(parse_record(read_lines(load_meta(demo / "mine" / "meta.json"))[3]), tok, settings)
    mean, std = NORMALIZE[settings.normalize_type]
    order = ["s3_img0_tile0.png", "s3_img1_tile0.png", "s3_img1_tile1.png", "s3_img1_tile2.png"]
    for k, name in enumerate(order):
        want = (tiles[name].astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
        assert np.abs(enc.pixel_values[k].permute(1, 2, 0).numpy() - want).max() < 1e-5


def test_errors_are_one_line(demo, tmp_path):
    out = cli("data", "inspect", demo / "mine" / "meta.json", "--model", demo / "model", "--index", "9")
    assert isinstance(out.exception, UserError) and "out of range" in str(out.exception)
    (tmp_path / "m.json").write_text('{"a": {"root": "", "annotation": "x.jsonl", "repeat_time": 1.5}}')
    out = cli("data", "inspect", tmp_path / "m.json", "--model", demo / "model")
    assert isinstance(out.exception, UserError) and "repeat_time" in str(out.exception)


def test_inspect_function_reports_failures(demo):
    tok = load_tokenizer(demo / "model")
    settings = EncodeSettings.from_checkpoint(inspect_checkpoint(demo / "model"))
    lines = read_lines(load_meta(demo / "mine" / "meta.json"))
    printed = []
    assert inspect(lines, [0, 2], tok, settings, color=False, echo=printed.append) == 1
    assert printed[0].startswith("# sample 0 (") and "[[hi<|im_end|>]]" in printed[1]
    assert printed[3].startswith("# sample 2: ") and "[missing_image]" in printed[3] and "first.jsonl:3" in printed[3]


def test_original_format_checkpoint(demo, tmp_path):
    """--model accepts an original (remote-code) checkpoint folder: only config and tokenizer are read."""
    src = FIXTURES / "InternVL2-1B"
    if not (src / "config.json").is_file() or not (src / "vocab.json").is_file():
        pytest.skip(f"real fixtures missing: {src}")
    out = cli("data", "inspect", demo / "mine" / "meta.json", "--model", src, "--index", "1", "--json")
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout)
    assert row["num_tiles"] == [3]  # 448-px tiles; the 128x64 image is a 2x1 grid + thumbnail
    assert row["input_ids"].count(151648) == 3 * 256  # InternVL2-1B <IMG_CONTEXT>, 256 tokens per tile
    tok = load_tokenizer(src)
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\n你是由上海人工智能实验室")  # Hermes-2: the InternVL2 template
    assert "<|im_end|><|im_start|>user\n<img>" in text  # no newline after <|im_end|>
