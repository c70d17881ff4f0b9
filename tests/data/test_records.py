"""Meta files and records in the official InternVL format (internvl_lora.data.records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_lora.data.meta import DatasetSpec, Line, apply_repeat, iter_lines, load_meta, read_lines
from internvl_lora.data.records import parse_record
from internvl_lora.errors import DataError

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real"

Q = {"from": "human", "value": "What is it?"}
A = {"from": "gpt", "value": "A cat."}


def line(obj, path="a.jsonl", number=1, root="/data") -> Line:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return Line(0, DatasetSpec("a", root, path), path, number, text)


def parse(obj, **kw):
    return parse_record(line(obj, **kw))


def kind_of(obj) -> str:
    with pytest.raises(DataError) as e:
        parse(obj)
    assert e.value.path == "a.jsonl" and e.value.line == 1
    return e.value.kind


def write_jsonl(path: Path, n: int, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"id": f"{tag}{k}", "conversations": [Q, A]}) + "\n" for k in range(n)))
    return path


# ------------------------------------------------------------------------------------------- records


def test_pure_text():
    r = parse({"id": 7, "conversations": [Q, A]})
    assert r.kind == "text" and r.images == [] and r.video is None and r.system is None and r.id == 7
    assert r.turns == [("human", "What is it?"), ("gpt", "A cat.")]


def test_empty_image_field_is_pure_text():
    # official dispatch: "image present and non-empty"
    assert parse({"image": "", "conversations": [Q, A]}).kind == "text"
    assert parse({"image": [], "conversations": [Q, A]}).kind == "text"


def test_one_image_with_placeholder():
    r = parse({"image": "x/a.jpg", "conversations": [{"from": "human", "value": "Look: <image>\nWhat?"}, A]})
    assert r.kind == "image" and r.images == ["/data/x/a.jpg"]
    assert r.turns[0][1] == "Look: <image>\nWhat?"  # untouched


def test_one_image_placeholder_inserted_into_first_human_turn():
    r = parse({"image": "a.jpg", "conversations": [Q, A]})
    assert r.turns[0] == ("human", "<image>\nWhat is it?")


def test_missing_placeholder_never_goes_into_the_system_turn():
    # Official: prepended to conversations[0], which is the system turn here (a quirk). Ours: first human turn.
    r = parse({"image": "a.jpg", "conversations": [{"from": "system", "value": "Be brief."}, Q, A]})
    assert r.system == "Be brief."
    assert r.turns == [("human", "<image>\nWhat is it?"), ("gpt", "A cat.")]


def test_placeholder_in_a_later_question_is_not_duplicated():
    r = parse({"image": "a.jpg", "conversations": [Q, A, {"from": "human", "value": "And <image>?"}, A]})
    assert [t for _, t in r.turns] == ["What is it?", "A cat.", "And <image>?", "A cat."]


def test_leading_system_turn_becomes_the_system_prompt():
    r = parse({"conversations": [{"from": "system", "value": "You are terse."}, Q, A, Q, A]})
    assert r.system == "You are terse." and len(r.turns) == 4


def test_several_images_need_one_placeholder_each():
    obj = {"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"}, A]}
    r = parse(obj)
    assert r.kind == "multi_image" and r.images == ["/data/a.jpg", "/data/b.jpg"]
    obj["conversations"][0]["value"] = "Image-1: <image>\nSame?"
    assert kind_of(obj) == "image_count"


def test_a_list_of_one_image_is_the_multi_image_path_without_auto_insert():
    assert parse({"image": ["a.jpg"], "conversations": [{"from": "human", "value": "<image>"}, A]}).kind == "multi_image"
    assert kind_of({"image": ["a.jpg"], "conversations": [Q, A]}) == "image_count"


def test_absolute_image_path_wins_over_root_and_s3_root_concatenates():
    assert parse({"image": "/abs/a.jpg", "conversations": [Q, A]}).images == ["/abs/a.jpg"]
    r = parse_record(line({"image": "a.jpg", "conversations": [Q, A]}, root="s3://bucket/imgs/"))
    assert r.images == ["s3://bucket/imgs/a.jpg"]


def test_video_record_gets_the_video_placeholder_in_the_first_question():
    r = parse({"video": "v.mp4", "clip": [1, 2.5], "conversations": [Q, A]})
    assert r.kind == "video" and r.video == "/data/v.mp4" and r.clip == (1.0, 2.5)
    assert r.turns[0][1] == "<video>\nWhat is it?"
    r = parse({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, A]})
    assert r.turns[0][1] == "<video>\nWhat?"


@pytest.mark.parametrize("obj, kind", [
    ({"video": "v.mp4", "conversations": [Q, A, {"from": "human", "value": "<video>"}, A]}, "image_count"),
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video><video>"}, A]}, "image_count"),
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\n<image>"}, A]}, "image_count"),
    ({"video": "v.mp4", "image": "a.jpg", "conversations": [Q, A]}, "image_and_video"),
    ({"video": ["v.mp4"], "conversations": [Q, A]}, "bad_video_field"),
    ({"video": "v.mp4", "clip": [3, 1], "conversations": [Q, A]}, "bad_video_field"),
    ({"video": "v.mp4", "clip": "0-3", "conversations": [Q, A]}, "bad_video_field"),
    ({"clip": [0, 1], "conversations": [Q, A]}, "bad_video_field"),
    ({"conversations": [{"from": "human", "value": "<video>"}, A]}, "image_count"),
])
def test_video_field_problems(obj, kind):
    assert kind_of(obj) == kind


def test_grounding_text_passes_through_untouched():
    answer = "<ref>the cat</ref><box>[[12, 40, 388, 990]]</box> and <quad>[[1, 2, 3, 4, 5, 6, 7, 8]]</quad>"
    question = "Please provide the bounding box coordinate(s) of the region this sentence describes: <ref>the cat</ref>"
    r = parse({"image": "a.jpg", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    assert r.turns == [("human", "<image>\n" + question), ("gpt", answer)]


def test_grounding_tags_are_single_special_tokens_of_a_real_tokenizer():
    folder = FIXTURES / "InternVL2_5-1B-MPO"
    if not folder.is_dir():
        pytest.skip(f"real tokenizer fixtures missing: {folder}")
    from transformers import AutoTokenizer

    from internvl_lora.data.encode import EncodeSettings, encode_record
    from internvl_lora.internvl.templates import get_template

    tok = AutoTokenizer.from_pretrained(str(folder))
    tags = ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"]
    ids = {t: tok.convert_tokens_to_ids(t) for t in tags}
    # the published ids of the Qwen2-family InternVL tokenizers
    assert ids == {"<quad>": 151668, "</quad>": 151669, "<ref>": 151670, "</ref>": 151671, "<box>": 151672,
                   "</box>": 151673}
    answer = "<ref>the cat</ref><box>[[12, 40, 388, 990]]</box><quad>[[1, 2, 3, 4]]</quad>"
    r = parse({"conversations": [{"from": "human", "value": "Where is <ref>the cat</ref>?"},
                                 {"from": "gpt", "value": answer}]})
    settings = EncodeSettings(template=get_template("internvl2_5"), tile_size=448, tokens_per_tile=256,
                              max_dynamic_patch=6)
    enc = encode_record(r, tok, settings)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    for t in tags:
        assert trained.count(ids[t]) == 1, t  # each tag is one token, inside the trained answer
    assert tok.decode(trained[:-1]) == answer  # the answer round-trips untouched (last token: <|im_end|>)


@pytest.mark.parametrize("obj, kind", [
    ({"conversations": []}, "no_conversations"),
    ({"id": 1}, "no_conversations"),
    ({"conversations": [Q, {"from": "gpt", "value": 3}]}, "bad_turn"),
    ({"conversations": [Q, "A cat."]}, "bad_turn"),
    ({"conversations": [Q, {"from": "assistant", "value": "x"}]}, "bad_role"),
    ({"conversations": [A, Q]}, "bad_role_order"),
    ({"conversations": [Q, Q, A]}, "bad_role_order"),
    ({"conversations": [Q, {"from": "system", "value": "late"}, A]}, "bad_role_order"),
    ({"conversations": [Q]}, "missing_answer"),
    ({"conversations": [Q, A, Q]}, "missing_answer"),
    ({"conversations": [{"from": "system", "value": "s"}]}, "missing_answer"),
    ({"conversations": [Q, {"from": "gpt", "value": "  \n"}]}, "empty_answer"),
    ({"conversations": [{"from": "human", "value": "<img>x</img>"}, A]}, "bad_placeholder"),
    ({"conversations": [{"from": "human", "value": "<IMG_CONTEXT>"}, A]}, "bad_placeholder"),
    ({"image": "a.jpg", "conversations": [Q, {"from": "gpt", "value": "<image>"}]}, "bad_placeholder"),
    ({"image": "a.jpg", "conversations": [{"from": "system", "value": "<image>"}, Q, A]}, "bad_placeholder"),
    ({"conversations": [{"from": "human", "value": "<image>"}, A]}, "image_count"),
    ({"image": 5, "conversations": [Q, A]}, "bad_image_field"),
    ({"image": ["a.jpg", ""], "conversations": [Q, A]}, "bad_image_field"),
    ("[1, 2]", "bad_json"),
    ('{"conversations": [', "bad_json"),
    ("[" * 100_000 + "]" * 100_000, "bad_json"),
    ('{"id": ' + "1" * 5000 + "}", "bad_json"),
])
def test_record_problems(obj, kind):
    assert kind_of(obj) == kind


def test_non_utf8_line_is_reported_with_its_line(tmp_path):
    f = tmp_path / "t.jsonl"
    good = json.dumps({"conversations": [Q, A]}).encode()
    f.write_bytes(good + b"\n\n" + b'{"conversations": "caf\xe9"}\n' + good + b"\n")
    lines = iter_lines(load_meta(f))
    assert [ln.line for ln in lines] == [1, 3, 4]  # blank line 2 skipped, numbering kept
    with pytest.raises(DataError) as e:
        parse_record(lines[1])
    assert (e.value.kind, e.value.line) == ("bad_encoding", 3) and "0xe9" in str(e.value)
    parse_record(lines[2])


def test_byte_order_mark_is_ignored(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"conversations": [Q, A]}).encode() + b"\r\n")
    parse_record(iter_lines(load_meta(f))[0])


# ---------------------------------------------------------------------------------------------- meta


def test_bare_jsonl_path_uses_defaults(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", 3)
    specs = load_meta(tmp_path / "t.jsonl")
    assert len(specs) == 1 and not specs.problems
    s = specs[0]
    assert (s.root, s.data_augment, s.repeat_time, s.max_dynamic_patch) == (str(tmp_path), False, 1.0, None)


def test_meta_fields_and_dataset_mixing(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 4, "a")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", 2, "b")
    (tmp_path / "meta.json").write_text(json.dumps({
        "first": {"root": "imgs/", "annotation": "a.jsonl", "data_augment": True, "repeat_time": 1,
                  "max_dynamic_patch": 12, "length": 4},
        "second": {"root": "/abs/", "annotation": "sub/b.jsonl", "data_augment": False, "repeat_time": 2},
    }, indent=2))
    specs = load_meta(tmp_path / "meta.json")
    assert [s.name for s in specs] == ["first", "second"] and not specs.problems
    a, b = specs
    assert (a.root, a.data_augment, a.max_dynamic_patch) == (str(tmp_path / "imgs/"), True, 12)
    assert (b.root, b.data_augment, b.repeat_time, b.max_dynamic_patch) == ("/abs/", False, 2.0, None)
    lines = read_lines(specs)
    # indices: meta order, then line order
    assert [(ln.index, ln.spec.name, ln.line) for ln in lines] == [
        (0, "first", 1), (1, "first", 2), (2, "first", 3), (3, "first", 4), (4, "second", 1), (5, "second", 2)]
    assert [json.loads(ln.text)["id"] for ln in apply_repeat(lines)] == ["a0", "a1", "a2", "a3", "b0", "b1", "b0", "b1"]


@pytest.mark.parametrize("repeat, n, expected", [
    (0.5, 10, list(range(5))),  # the first half, in order (not a random half)
    (0.25, 10, [0, 1]),  # int(10 * 0.25)
    (0.33, 10, [0, 1, 2]),
    (1, 3, [0, 1, 2]),
    (2, 3, [0, 1, 2, 0, 1, 2]),
    (3.0, 2, [0, 1, 0, 1, 0, 1]),
])
def test_repeat_time(tmp_path, repeat, n, expected):
    write_jsonl(tmp_path / "a.jsonl", n)
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": "", "annotation": "a.jsonl", "data_augment": False,
                                                          "repeat_time": repeat}}))
    lines = apply_repeat(read_lines(load_meta(tmp_path / "meta.json")))
    assert [int(json.loads(ln.text)["id"]) for ln in lines] == expected


def meta_problems_of(tmp_path, entries: dict, raw: str | None = None):
    (tmp_path / "meta.json").write_text(raw if raw is not None else json.dumps(entries, indent=2))
    specs = load_meta(tmp_path / "meta.json")
    return specs, [(p.kind, p.line) for p in specs.problems]


def test_fractional_repeat_above_one_is_rejected_with_a_clear_message(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 2)
    specs, problems = meta_problems_of(tmp_path, {"d": {"root": "", "annotation": "a.jsonl", "repeat_time": 1.5}})
    assert problems == [("bad_repeat_time", 2)] and len(specs) == 0
    msg = str(specs.problems[0])
    assert "meta.json:2" in msg and "1.5" in msg and "whole number" in msg and "'d'" in msg
    with pytest.raises(DataError, match="repeat_time 1.5"):
        read_lines(specs)


def test_every_bad_entry_is_reported_with_its_line_and_good_entries_kept(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 2)
    entries = {
        "good": {"root": "", "annotation": "a.jsonl"},
        "no_annotation": {"root": ""},  # (no root is fine: docs/data.md)
        "typo": {"root": "", "annotation": "a.jsonl", "data_agument": True},
        "augment_text": {"root": "", "annotation": "a.jsonl", "data_augment": "yes"},
        "patch": {"root": "", "annotation": "a.jsonl", "max_dynamic_patch": 0},
        "zero": {"root": "", "annotation": "a.jsonl", "repeat_time": 0},
        "string_repeat": {"root": "", "annotation": "a.jsonl", "repeat_time": "2"},
        "json_file": {"root": "", "annotation": "a.json"},
        "gone": {"root": "", "annotation": "missing.jsonl"},
        "not_object": [1, 2],
    }
    specs, problems = meta_problems_of(tmp_path, entries)
    assert [s.name for s in specs] == ["good"]
    # json.dumps(indent=2): entry k starts on line 2 + k * 4 for dict entries with 2 keys ... compute from text
    text = (tmp_path / "meta.json").read_text().splitlines()
    line_of = {name: next(i + 1 for i, t in enumerate(text) if t.startswith(f'  "{name}"')) for name in entries}
    assert problems == [
        ("bad_meta", line_of["no_annotation"]), ("bad_meta", line_of["typo"]), ("bad_meta", line_of["augment_text"]),
        ("bad_meta", line_of["patch"]), ("bad_repeat_time", line_of["zero"]),
        ("bad_repeat_time", line_of["string_repeat"]), ("bad_meta", line_of["json_file"]),
        ("missing_annotation", line_of["gone"]), ("bad_meta", line_of["not_object"]),
    ]
    assert "data_agument" in str(specs.problems[1])


def test_duplicate_dataset_names_are_reported(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 2)
    raw = '{\n "d": {"root": "", "annotation": "a.jsonl"},\n "d": {"root": "", "annotation": "a.jsonl"}\n}'
    _, problems = meta_problems_of(tmp_path, {}, raw)
    assert problems == [("bad_meta", 2)]


@pytest.mark.parametrize("raw, fragment", [
    ('{"d": {"root": ""', "not valid JSON"),
    ("[]", "JSON list"),
    ("[{\"conversations\": []}]", "data convert"),
    ("{}", "JSON object"),
    ('"text"', "JSON object"),
])
def test_unusable_meta_file_is_one_clear_error(tmp_path, raw, fragment):
    (tmp_path / "meta.json").write_text(raw)
    with pytest.raises(DataError) as e:
        load_meta(tmp_path / "meta.json")
    assert e.value.kind == "bad_meta" and fragment in str(e.value) and "meta.json" in str(e.value)


def test_meta_path_that_does_not_exist(tmp_path):
    with pytest.raises(DataError) as e:
        load_meta(tmp_path / "nope.json")
    assert e.value.kind == "missing_meta" and "nope.json" in str(e.value)
    with pytest.raises(DataError, match="folder"):
        load_meta(tmp_path)


def test_meta_paths_relative_to_meta_folder_or_else_working_folder(tmp_path, monkeypatch):
    (tmp_path / "meta").mkdir()
    (tmp_path / "cwd").mkdir()
    write_jsonl(tmp_path / "cwd" / "only_here.jsonl", 1)
    write_jsonl(tmp_path / "meta" / "both.jsonl", 1)
    write_jsonl(tmp_path / "cwd" / "both.jsonl", 1)
    (tmp_path / "meta" / "m.json").write_text(json.dumps({
        "a": {"root": "", "annotation": "only_here.jsonl"}, "b": {"root": "", "annotation": "both.jsonl"}}))
    monkeypatch.chdir(tmp_path / "cwd")
    a, b = load_meta(tmp_path / "meta" / "m.json")
    assert a.annotation == str(tmp_path / "cwd" / "only_here.jsonl")  # the official behaviour, as a fallback
    assert b.annotation == str(tmp_path / "meta" / "both.jsonl")  # beside the meta file first
