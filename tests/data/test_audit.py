"""The pre-flight data audit (internvl_lora.data.audit): counts, problems with file:line, video worst case."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from internvl_lora.data import encode as encode_mod
from internvl_lora.data.audit import PROBLEM_KINDS, audit, format_report, histogram
from internvl_lora.data.encode import EncodeSettings, encode_record
from internvl_lora.data.meta import load_meta
from internvl_lora.data.records import parse_record
from internvl_lora.internvl.templates import get_template
from internvl_lora.internvl.tiling import num_tiles

Q = {"from": "human", "value": "What color is it?"}
A = {"from": "gpt", "value": "red"}


# fixture `tok` (the tiny demo tokenizer): tests/data/conftest.py


def settings(**kw) -> EncodeSettings:
    base = dict(template=get_template("internvl2_5"), tile_size=64, tokens_per_tile=16, max_dynamic_patch=6,
                max_length=4096)
    base.update(kw)
    return EncodeSettings(**base)


def write(folder: Path, records: list, name: str = "train.jsonl") -> Path:
    path = folder / name
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")
    return path


def test_summary_counts_and_problems_with_file_and_line(tmp_path, tok):
    sizes = [(64, 64), (128, 64), (200, 60), (64, 300)]
    for k, size in enumerate(sizes):
        Image.new("RGB", size, (k * 40, 0, 0)).save(tmp_path / f"{k}.png")
    records = [
        {"image": "0.png", "conversations": [Q, A]},
        {"image": ["1.png", "2.png"], "conversations": [{"from": "human", "value": "<image><image>"}, A]},
        {"conversations": [Q, A]},
        {"image": "missing.png", "conversations": [Q, A]},  # line 4
        {"image": "3.png", "conversations": [Q, A, Q, A]},
        {"image": "0.png", "conversations": [Q, {"from": "gpt", "value": ""}]},  # line 6
        b"{not json",  # line 7
    ]
    f = write(tmp_path, records)
    r = audit(load_meta(f), tok, settings())
    assert [(p.kind, p.path, p.line) for p in r.problems] == [
        ("missing_image", str(f), 4), ("empty_answer", str(f), 6), ("bad_json", str(f), 7)]
    assert not r.ok and r.valid == [0, 1, 2, 4]
    want_tiles = sum(num_tiles(w, h, 64, budget) for (w, h), budget in
                     (((64, 64), 6), ((128, 64), 3), ((200, 60), 3), ((64, 300), 6)))
    s = r.summary()
    assert (s["samples"], s["valid"], s["invalid"], s["images"], s["tiles"]) == (7, 4, 3, 4, want_tiles)
    assert s["sample_types"] == {"image": 2, "multi_image": 1, "text": 1}
    assert s["problems_by_kind"] == {"missing_image": 1, "empty_answer": 1, "bad_json": 1}
    assert s["trained_tokens"] == 2 * 5  # "red" + <|im_end|> per answer (2 tokens) x 5 answers
    # the lengths are those of training's encoding
    for idx in r.valid:
        ln = r.lines[idx]
        assert r.lengths[idx] == len(encode_record(parse_record(ln), tok, settings()).input_ids)
    report = format_report(r)
    assert "samples: 7  valid: 4  with problems: 3" in report
    assert f"missing_image: 1  {f}:4" in report and f"{f}:7: [bad_json]" in report
    assert "token-length histogram:" in report


def test_each_image_is_checked_once(tmp_path, tok, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    f = write(tmp_path, [{"image": "a.png", "conversations": [Q, A]}] * 5 + [{"image": "b.png", "conversations": [Q, A]}] * 3)
    calls = []
    real = encode_mod.check_image
    monkeypatch.setattr(encode_mod, "check_image", lambda p, *a: calls.append(p) or real(p, *a))
    r = audit(load_meta(f), tok, settings())
    assert sorted(calls) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [(p.kind, p.line) for p in r.problems] == [("missing_image", 6), ("missing_image", 7), ("missing_image", 8)]


def test_meta_problems_are_reported_and_other_datasets_still_checked(tmp_path, tok):
    write(tmp_path, [{"conversations": [Q, A]}, {"conversations": [Q]}], "a.jsonl")
    (tmp_path / "meta.json").write_text(json.dumps({
        "a": {"root": "", "annotation": "a.jsonl", "data_augment": False, "repeat_time": 2},
        "b": {"root": "", "annotation": "a.jsonl", "repeat_time": 1.5},
        "c": {"root": "", "annotation": "gone.jsonl"},
    }, indent=1))
    r = audit(load_meta(tmp_path / "meta.json"), tok, settings())
    meta = str(tmp_path / "meta.json")
    assert [(p.kind, p.path, p.line) for p in r.problems] == [
        ("bad_repeat_time", meta, 8), ("missing_annotation", meta, 13), ("missing_answer", str(tmp_path / "a.jsonl"), 2)]
    s = r.summary()
    assert (s["samples"], s["valid"], s["invalid"], s["meta_problems"], s["samples_per_epoch"]) == (2, 1, 1, 2, 2)


def test_too_long_and_cut_text_are_counted(tmp_path, tok):
    f = write(tmp_path, [{"conversations": [Q, A]}, {"conversations": [Q, A, {"from": "human", "value": "x " * 300}, A]}])
    r = audit(load_meta(f), tok, settings(max_length=200))
    assert [(p.kind, p.line) for p in r.problems] == [("too_long", 2)]
    r = audit(load_meta(f), tok, settings(max_length=200, truncation="cut_text"))
    assert r.ok and r.cut == [1] and r.lengths[1] == 200 and r.summary()["cut"] == 1
    assert "cut to max_length (truncation: cut_text): 1 sample(s)" in format_report(r)


def test_template_mismatch_is_a_problem_kind(tmp_path, tok):
    f = write(tmp_path, [{"conversations": [Q, A]}, {"conversations": [{"from": "human", "value": "a<|im_end|>b"}, A]}])
    r = audit(load_meta(f), tok, settings(template=get_template("Hermes-2")))
    assert [(p.kind, p.line) for p in r.problems] == [("template_mismatch", 2)]


def test_video_audit_checks_the_worst_case_frame_count(tmp_path, tok, write_video):
    write_video(tmp_path / "v.mp4", [np.full((32, 32, 3), i * 8, np.uint8) for i in range(30)])
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 500)
    f = write(tmp_path, [{"video": "v.mp4", "conversations": [Q, A]}, {"video": "bad.mp4", "conversations": [Q, A]},
                         {"video": "nope.mp4", "conversations": [Q, A]}])
    s = settings(min_num_frames=2, max_num_frames=5)
    r = audit(load_meta(f), tok, s)
    assert [(p.kind, p.line) for p in r.problems] == [("unreadable_video", 2), ("missing_video", 3)]
    worst = r.lengths[0]
    assert r.videos == 1 and r.video_frames == 5 and r.tiles == 5
    rec = parse_record(r.lines[0])
    lengths = {len(encode_record(rec, tok, s, rng=random.Random(seed)).input_ids) for seed in range(12)}
    assert max(lengths) <= worst and len(lengths) > 1  # random counts, none above the audited worst case
    # max_length just below the worst case: the sample is reported even though most draws would fit
    r = audit(load_meta(f), tok, settings(min_num_frames=2, max_num_frames=5, max_length=worst - 1))
    assert ("too_long", 1) in [(p.kind, p.line) for p in r.problems]
    # without opening videos: counted as max_num_frames, files not checked
    r = audit(load_meta(f), tok, s, decode_video=False)
    assert r.ok and r.lengths[0] == worst


def test_every_reported_kind_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    for kind in PROBLEM_KINDS:
        assert f"`{kind}`" in doc, kind


def test_histogram():
    rows = histogram([10, 11, 12, 30, 30, 30], bins=3)
    assert len(rows) == 3 and rows[0].split()[-1] == "3" and rows[-1].split()[-1] == "3"
    assert histogram([]) == []
    assert histogram([5])[0].split()[-1] == "1"


def _mixed_data(tmp_path: Path) -> Path:
    """Valid, invalid and warned lines of every media kind, in an order that spreads them over chunks."""
    Image.new("RGB", (64, 64), (200, 0, 0)).save(tmp_path / "ok.png")
    Image.new("RGB", (160, 64), (0, 90, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "blank.png")  # a flat colour: a warning
    long_q = {"from": "human", "value": "<image>\n" + "x " * 300}
    kinds = [
        {"image": "ok.png", "conversations": [Q, A]},
        {"image": ["ok.png", "wide.png"], "conversations": [{"from": "human", "value": "<image><image>"}, A]},
        {"conversations": [Q, A, Q, A]},
        {"image": "missing.png", "conversations": [Q, A]},
        {"image": "blank.png", "conversations": [Q, A]},
        b"{not json",
        {"image": "wide.png", "conversations": [long_q, A]},  # too long at max_length 200
        {"conversations": [Q, {"from": "gpt", "value": ""}]},
    ]
    rng = random.Random(0)
    return write(tmp_path, [rng.choice(kinds) for _ in range(61)])


def test_audit_in_worker_processes_equals_one_process(tmp_path, tok, monkeypatch):
    import os

    from internvl_lora.data import audit as audit_mod

    f = _mixed_data(tmp_path)
    monkeypatch.setattr(audit_mod, "CHUNK", 5)
    monkeypatch.setattr(audit_mod, "PARALLEL_MIN_LINES", 10)
    pids = tmp_path / "pids"
    pids.mkdir()
    real = audit_mod._Job.check
    monkeypatch.setattr(audit_mod._Job, "check",  # forked workers inherit the patch: each chunk leaves its pid
                        lambda self, lines: (pids / f"{os.getpid()}-{lines[0].index}").touch() or real(self, lines))
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    s = settings(max_length=200)
    one = audit(load_meta(f), tok, s, workers=1)
    assert [p.name for p in pids.iterdir()] == [f"{os.getpid()}-0"]  # one process: all lines here
    (pids / f"{os.getpid()}-0").unlink()
    many = audit(load_meta(f), tok, s, workers=3)
    ran = {p.name.split("-")[0] for p in pids.iterdir()}
    assert len(list(pids.iterdir())) == 13 and str(os.getpid()) not in ran and len(ran) > 1
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # put back as it was
    for field_name in ("valid", "lengths", "problems", "warnings", "images", "videos", "video_frames", "tiles",
                       "trained_tokens", "cut", "kinds"):
        assert getattr(many, field_name) == getattr(one, field_name), field_name
    assert format_report(many) == format_report(one)
    # the data has every kind of outcome
    assert {p.kind for p in one.problems} == {"missing_image", "bad_json", "too_long", "empty_answer"}
    assert {w.kind for w in one.warnings} == {"blank_image"} and one.valid


def test_a_bug_in_a_worker_process_is_raised_not_swallowed(tmp_path, tok, monkeypatch):
    import pytest

    from internvl_lora.data import audit as audit_mod

    f = _mixed_data(tmp_path)
    monkeypatch.setattr(audit_mod, "CHUNK", 5)
    monkeypatch.setattr(audit_mod, "PARALLEL_MIN_LINES", 10)

    def broken(*a, **k):
        raise RuntimeError("a bug in the encoder")

    monkeypatch.setattr(audit_mod, "encode_record", broken)
    with pytest.raises(RuntimeError, match="a bug in the encoder"):
        audit(load_meta(f), tok, settings(), workers=2)


def test_audit_workers_share_the_cores_among_local_ranks(monkeypatch):
    import os

    from internvl_lora.data.audit import audit_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert audit_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert audit_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert audit_workers() == 1
