"""The training dataset (repeat_time, data_augment, epochs) and the padding collator."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_lora.data.audit import audit
from internvl_lora.data.dataset import SampleLoadError, SupervisedDataset
from internvl_lora.data.encode import EncodeSettings
from internvl_lora.data.meta import load_meta
from internvl_lora.errors import DataError, UserError
from internvl_lora.internvl.templates import get_template

A = {"from": "gpt", "value": "red"}


# fixture `tok` (the tiny demo tokenizer): tests/data/conftest.py


SETTINGS = dict(template=get_template("internvl2_5"), tile_size=64, tokens_per_tile=16, max_dynamic_patch=6)


def dataset_dir(tmp_path: Path, augment: bool, repeat=1, n: int = 4) -> Path:
    for k in range(n):  # smooth pictures: a JPEG re-encode changes them a little
        arr = np.zeros((64, 128, 3), np.uint8)
        arr[..., 0] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :]
        arr[..., 1] = np.linspace(255, 0, 64, dtype=np.uint8)[:, None]
        arr[..., 2] = 40 * k
        Image.fromarray(arr).save(tmp_path / f"{k}.png")
    with open(tmp_path / "a.jsonl", "w") as f:
        for k in range(n):
            f.write(json.dumps({"id": k, "image": f"{k}.png", "conversations": [
                {"from": "human", "value": f"Image {k}?"}, A]}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {
        "root": ".", "annotation": "a.jsonl", "data_augment": augment, "repeat_time": repeat}}))
    return tmp_path / "meta.json"


def build(meta: Path, tok, train: bool = True, seed: int = 0):
    settings = EncodeSettings(**SETTINGS)
    return SupervisedDataset(audit(load_meta(meta), tok, settings), tok, settings, train=train, seed=seed)


def test_data_augment_changes_pixels_deterministically_and_only_in_train(tmp_path, tok):
    (tmp_path / "p").mkdir()
    plain = build(dataset_dir(tmp_path / "p", augment=False), tok)
    meta = dataset_dir(tmp_path, augment=True)
    train_a, train_b = build(meta, tok, seed=3), build(meta, tok, seed=3)
    evaluation = build(meta, tok, train=False, seed=3)
    for i in range(len(train_a)):
        a, b, e, p = train_a[i], train_b[i], evaluation[i], plain[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # same seed: same pixels
        assert torch.equal(e["pixel_values"], p["pixel_values"])  # not in evaluation
        assert not torch.equal(a["pixel_values"], e["pixel_values"])  # JPEG re-encoded in training
        assert a["pixel_values"].shape == e["pixel_values"].shape and a["num_tiles"] == e["num_tiles"] == [3]
        assert torch.equal(a["input_ids"], e["input_ids"]) and torch.equal(a["labels"], e["labels"])
        # a re-encode with quality 75..100, not another image: close on average
        assert float((a["pixel_values"] - e["pixel_values"]).abs().mean()) < 0.1
    other_seed = build(meta, tok, seed=4)
    assert any(not torch.equal(train_a[i]["pixel_values"], other_seed[i]["pixel_values"]) for i in range(len(train_a)))
    # every epoch gets its own draw, reproducibly
    epoch0 = train_a[0]["pixel_values"]
    train_a.set_epoch(1)
    assert not torch.equal(train_a[0]["pixel_values"], epoch0)
    train_b.set_epoch(1)
    assert torch.equal(train_a[0]["pixel_values"], train_b[0]["pixel_values"])


def test_data_augment_never_applies_to_video(tmp_path, tok):
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(20):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 10, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (tmp_path / "a.jsonl").write_text(json.dumps({"video": "v.mp4", "conversations": [
        {"from": "human", "value": "What?"}, A]}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"root": ".", "annotation": "a.jsonl", "data_augment": True,
                                                          "repeat_time": 1}}))
    settings = EncodeSettings(**SETTINGS, min_num_frames=2, max_num_frames=4)
    result = audit(load_meta(tmp_path / "meta.json"), tok, settings)
    train = SupervisedDataset(result, tok, settings, train=True, seed=1)
    evaluation = SupervisedDataset(result, tok, settings, train=False, seed=1)
    assert torch.equal(train[0]["pixel_values"], evaluation[0]["pixel_values"])


def test_repeat_time_in_the_dataset_and_lengths_from_the_audit(tmp_path, tok):
    ds = build(dataset_dir(tmp_path, augment=False, repeat=2, n=3), tok)
    assert len(ds) == 6 and [ln.line for ln in ds.lines] == [1, 2, 3, 1, 2, 3]
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(6)]
    (tmp_path / "h").mkdir()
    half = build(dataset_dir(tmp_path / "h", augment=False, repeat=0.5, n=4), tok)
    assert [ln.line for ln in half.lines] == [1, 2]


def test_only_valid_samples_are_used(tmp_path, tok):
    meta = dataset_dir(tmp_path, augment=False, n=3)
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write(json.dumps({"image": "gone.png", "conversations": [{"from": "human", "value": "?"}, A]}) + "\n")
        f.write("oops\n")
    ds = build(meta, tok)
    assert [ln.line for ln in ds.lines] == [1, 2, 3]


def test_a_file_that_breaks_after_the_audit_is_a_clear_error(tmp_path, tok):
    ds = build(dataset_dir(tmp_path, augment=False, n=2), tok)
    (tmp_path / "1.png").write_bytes(b"broken")
    ds[0]
    with pytest.raises(SampleLoadError) as e:
        ds[1]
    assert isinstance(e.value, DataError) and isinstance(e.value, UserError)
    assert e.value.kind == "corrupt_image" and e.value.line == 2 and "passed the data audit" in str(e.value)
    # a DataLoader worker re-raises an exception type from one message: this one survives that
    again = type(e.value)("Caught SampleLoadError in DataLoader worker process 0.\n...")
    assert isinstance(again, SampleLoadError)
    pickle.loads(pickle.dumps(e.value))


