"""Tests for internvl_lora.data.convert."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_lora.data.convert import stream as cv
from internvl_lora.data.convert import (
    ConvertStats,
    convert,
    json_to_jsonl,
    jsonl_to_jsonl,
    openai_to_internvl,
    rejected_path_for,
    sharegpt_to_internvl,
)
from internvl_lora.errors import DataError


def read_jsonl(path) -> list:
    # split on "\n" only: str.splitlines() would also split on U+0085 / U+2028 inside strings
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def write_jsonl(path, records) -> Path:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return Path(path)


def conv(*pairs):
    roles = {"h": "human", "g": "gpt", "s": "system"}
    return [{"from": roles[r], "value": v} for r, v in pairs]


def png_data_url(color=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------ json / jsonl


def test_json_to_jsonl_official_semantics(tmp_path):
    records = [
        {"id": "a", "image": "x.jpg", "conversations": conv(("s", "Be brief."), ("h", "<image>\n猫?"), ("g", "是的"))},
        {"conversations": conv(("h", "hi"), ("g", "hello"))},
        {"id": 99, "video": "v.mp4", "conversations": conv(("h", "<video>\nwhat?"), ("g", "a dog"))},
    ]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    stats = json_to_jsonl(src, tmp_path / "out.jsonl")
    assert isinstance(stats, ConvertStats)
    assert (stats.written, stats.rejected, stats.rejected_path) == (3, 0, None)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    assert "猫" in lines[0]  # ensure_ascii=False
    out = [json.loads(x) for x in lines]
    assert [r["id"] for r in out] == [0, 1, 2]
    assert out[0]["conversations"] == conv(("h", "<image>\n猫?"), ("g", "是的"))
    assert list(out[0]) == ["id", "image", "conversations"]  # existing key keeps its place
    assert list(out[1]) == ["conversations", "id"]  # a new id is appended, like the official tool
    assert lines[2] == json.dumps(out[2], ensure_ascii=False)


def test_keep_system_keeps_leading_system_turn(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"conversations": conv(("s", "S"), ("h", "q"), ("g", "a"))}]))
    json_to_jsonl(src, tmp_path / "out.jsonl", keep_system=True)
    assert read_jsonl(tmp_path / "out.jsonl")[0]["conversations"][0] == {"from": "system", "value": "S"}


def test_json_streaming_across_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cv, "_CHUNK", 3)
    records = [{"id": i, "n": 12345678901234 * i, "conversations": conv(("h", "q" * i + "é"), ("g", "a"))} for i in range(20)]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    json_to_jsonl(src, tmp_path / "out.jsonl")
    assert [r["n"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["n"] for r in records]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.text(min_size=0, max_size=30), min_size=0, max_size=8),
    chunk=st.integers(min_value=1, max_value=64),
    indent=st.sampled_from([None, 0, 2]),
)
def test_json_stream_matches_json_load(tmp_path_factory, texts, chunk, indent):
    d = tmp_path_factory.mktemp("prop")
    records = [{"conversations": conv(("h", t), ("g", t[::-1])), "x": [1.5, None, True]} for t in texts]
    src = d / "in.json"
    src.write_text(json.dumps(records, ensure_ascii=False, indent=indent), encoding="utf-8")
    old = cv._CHUNK
    cv._CHUNK = chunk
    try:
        json_to_jsonl(src, d / "out.jsonl")
    finally:
        cv._CHUNK = old
    expected = [dict(r, id=i) for i, r in enumerate(json.loads(src.read_text(encoding="utf-8")))]
    assert read_jsonl(d / "out.jsonl") == expected


@pytest.mark.parametrize(
    "text, kind, line, fragment",
    [
        ('[\n {"conversations": []},\n {"a": 1,,}\n]', "bad_json", 3, "not valid JSON"),
        ('[\n {"conversations": [{"from": "human", "value": "q"}]},\n]\n', "bad_json", 3, "trailing comma"),
        ('{"conversations": []}\n', "bad_json", 1, "--from jsonl"),
        ("", "bad_json", 1, "empty"),
        ('[\n {"a": 1}\n', "bad_json", 3, "missing ']'"),
        ('[{"a": 1} {"b": 2}]', "bad_json", 1, "expected ','"),
        ('[{"a": 1}]\nextra', "bad_json", 2, "extra data"),
    ],
)
def test_json_syntax_errors_name_file_and_line(tmp_path, text, kind, line, fragment):
    src = tmp_path / "bad.json"
    src.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as ei:
        json_to_jsonl(src, tmp_path / "out.jsonl", skip_invalid=True)
    e = ei.value
    assert (e.kind, e.path, e.line) == (kind, str(src), line)
    assert fragment in str(e)
    assert not (tmp_path / "out.jsonl").exists()


def test_json_bad_utf8_reports_line(tmp_path):
    src = tmp_path / "bad.json"
    src.write_bytes(b'[\n{"conversations": [{"from": "human", "value": "\xff"}]}\n]')
    with pytest.raises(DataError) as ei:
        json_to_jsonl(src, tmp_path / "out.jsonl")
    assert (ei.value.kind, ei.value.line) == ("bad_encoding", 2)


def test_json_record_errors_fail_or_are_rejected(tmp_path):
    src = tmp_path / "in.json"
    src.write_text('[\n{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},\n'
                   '{"image": "x.jpg"},\n"just a string",\n'
                   '{"conversations": [{"from": "system", "value": "only system"}]}\n]')
    with pytest.raises(DataError) as ei:
        json_to_jsonl(src, tmp_path / "out.jsonl")
    assert (ei.value.kind, ei.value.line) == ("no_conversations", 3)
    assert str(ei.value).startswith(f"{src}:3: [no_conversations]")
    assert not (tmp_path / "out.jsonl").exists()

    stats = json_to_jsonl(src, tmp_path / "out.jsonl", skip_invalid=True)
    assert (stats.written, stats.rejected) == (1, 3)
    assert stats.rejected_path == str(tmp_path / "out.rejected.jsonl")
    rej = read_jsonl(stats.rejected_path)
    assert [(r["line"], r["kind"]) for r in rej] == [(3, "no_conversations"), (4, "bad_record"), (5, "no_conversations")]
    assert rej[0]["record"] == {"image": "x.jpg"} and rej[0]["source"] == f"{src}:3"
    assert read_jsonl(tmp_path / "out.jsonl")[0]["id"] == 0


def test_jsonl_to_jsonl(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"id": 7, "conversations": conv(("s", "S"), ("h", "q1"), ("g", "a1"))}) + "\n\n   \n"
        + json.dumps({"id": 3, "conversations": conv(("h", "q2"), ("g", "a2"))}) + "\n",
        encoding="utf-8",
    )
    stats = jsonl_to_jsonl(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert stats.written == 2
    assert [r["id"] for r in out] == [0, 1]
    assert out[0]["conversations"] == conv(("h", "q1"), ("g", "a1"))


def test_jsonl_bad_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
                    b'{"conversations": [\n'
                    b'\xff\xfe\n'
                    b'[1, 2]\n')
    with pytest.raises(DataError) as ei:
        jsonl_to_jsonl(src, tmp_path / "out.jsonl")
    assert (ei.value.kind, ei.value.path, ei.value.line) == ("bad_json", str(src), 2)
    stats = jsonl_to_jsonl(src, tmp_path / "out.jsonl", skip_invalid=True)
    assert (stats.written, stats.rejected) == (1, 3)
    rej = read_jsonl(rejected_path_for(tmp_path / "out.jsonl"))
    assert [(r["line"], r["kind"]) for r in rej] == [(2, "bad_json"), (3, "bad_encoding"), (4, "bad_record")]
    assert rej[0]["raw"] == '{"conversations": ['
    assert rej[2]["record"] == [1, 2]


def test_pretty_printed_json_given_as_jsonl_gets_a_hint(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps([{"conversations": conv(("h", "q"), ("g", "a"))}], indent=2))
    with pytest.raises(DataError, match="--from json"):
        jsonl_to_jsonl(src, tmp_path / "out.jsonl")


def test_stale_rejected_file_removed_and_failed_run_keeps_old_output(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"conversations": conv(("h", "q"), ("g", "a"))}])
    dst = tmp_path / "out.jsonl"
    rejected_path_for(dst).write_text("old\n")
    dst.write_text("previous\n")
    jsonl_to_jsonl(good, dst)
    assert not rejected_path_for(dst).exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])
    before = dst.read_text()
    with pytest.raises(DataError):
        jsonl_to_jsonl(bad, dst)
    assert dst.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out.jsonl"]


def test_missing_input_and_same_output(tmp_path):
    with pytest.raises(DataError) as ei:
        json_to_jsonl(tmp_path / "nope.json", tmp_path / "out.jsonl")
    assert ei.value.kind == "missing_file"
    src = write_jsonl(tmp_path / "a.jsonl", [{"conversations": conv(("h", "q"), ("g", "a"))}])
    with pytest.raises(DataError, match="different DST"):
        jsonl_to_jsonl(src, src)


def test_output_folder_is_created(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"conversations": conv(("h", "q"), ("g", "a"))}])
    stats = jsonl_to_jsonl(src, tmp_path / "new" / "deep" / "out.jsonl")
    assert stats.written == 1 and (tmp_path / "new" / "deep" / "out.jsonl").exists()


# ------------------------------------------------------------------------------ sharegpt


def test_sharegpt_messages_layout(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "system", "content": "You help."},
                      {"role": "user", "content": "<image>What is it?"},
                      {"role": "assistant", "content": "A cat."}],
         "images": ["imgs/1.jpg"]},
        {"messages": [{"role": "user", "content": "<image><image>Differences?"},
                      {"role": "assistant", "content": "Colour."},
                      {"role": "user", "content": "And size?"},
                      {"role": "assistant", "content": "Same."}],
         "images": ["a.jpg", {"path": "b.jpg"}], "id": "s2", "width_list": [1, 2], "label": "cats"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ])
    stats = sharegpt_to_internvl(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert stats.written == 3
    assert out[0] == {"id": 0, "image": "imgs/1.jpg", "conversations": [
        {"from": "system", "value": "You help."}, {"from": "human", "value": "<image>What is it?"},
        {"from": "gpt", "value": "A cat."}]}
    assert out[1]["id"] == "s2" and out[1]["image"] == ["a.jpg", "b.jpg"] and out[1]["width_list"] == [1, 2]
    assert out[1]["label"] == "cats"  # non-KTO labels are metadata and carried over
    assert out[1]["conversations"][2] == {"from": "human", "value": "And size?"}
    assert out[2] == {"id": 2, "conversations": conv(("h", "Hi"), ("g", "Hello"))}


def test_sharegpt_llamafactory_conversations_and_system_field(tmp_path):
    src = tmp_path / "in.json"  # a JSON list is detected from its first character
    src.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Dark."}],
         "system": "Be terse.", "images": ["p.png"]},
    ]))
    sharegpt_to_internvl(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")[0]
    # no tag: one "<image>\n" per image goes in front of the first question
    assert out["conversations"] == conv(("s", "Be terse."), ("h", "<image>\nDescribe."), ("g", "Dark."))
    sharegpt_to_internvl(src, tmp_path / "out2.jsonl", keep_system=False)
    assert read_jsonl(tmp_path / "out2.jsonl")[0]["conversations"][0]["from"] == "human"


def test_sharegpt_multi_image_without_tags_and_video(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "Compare."}, {"role": "assistant", "content": "ok"}],
         "images": ["a.jpg", "b.jpg"]},
        {"messages": [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": "Rain."}],
         "videos": ["clip.mp4"], "clip": [1, 3]},
        {"messages": [{"role": "user", "content": "<video>\nWhat happens?"}, {"role": "assistant", "content": "Sun."}],
         "videos": "clip2.mp4"},
    ])
    sharegpt_to_internvl(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0]["conversations"][0]["value"] == "<image>\n<image>\nCompare."
    assert out[1] == {"id": 1, "video": "clip.mp4", "conversations": conv(("h", "<video>\nWhat happens?"), ("g", "Rain.")),
                      "clip": [1, 3]}
    assert out[2]["video"] == "clip2.mp4" and out[2]["conversations"][0]["value"] == "<video>\nWhat happens?"


def test_sharegpt_accepts_llava_style_records(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "x", "image": "a.jpg", "conversations": conv(("h", "<image>\nq"), ("g", "a"))},
        {"video": "v.mp4", "clip": [0, 2], "conversations": conv(("h", "q"), ("g", "a"))},
    ])
    sharegpt_to_internvl(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0] == {"id": "x", "image": "a.jpg", "conversations": conv(("h", "<image>\nq"), ("g", "a"))}
    assert out[1] == {"id": 1, "video": "v.mp4", "conversations": conv(("h", "<video>\nq"), ("g", "a")), "clip": [0, 2]}
    both = write_jsonl(tmp_path / "both.jsonl", [{"image": "a.jpg", "images": ["b.jpg"], "conversations": conv(("h", "q"), ("g", "a"))}])
    with pytest.raises(DataError, match="keep one"):
        sharegpt_to_internvl(both, tmp_path / "out2.jsonl")


def test_sharegpt_msswift_pairs(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"system": "S", "conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]},
    ])
    sharegpt_to_internvl(src, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl")[0]["conversations"] == conv(
        ("s", "S"), ("h", "q1"), ("g", "a1"), ("h", "q2"), ("g", "a2"))


@pytest.mark.parametrize(
    "record, kind, fragment",
    [
        ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
          "images": ["a.jpg", "b.jpg"]}, "image_count", "1 <image> tag(s) for 2 image(s)"),
        ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]},
         "bad_placeholder", "no images"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}],
          "images": ["a.jpg"]}, "bad_placeholder", "assistant"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
         "unsupported_role", "tool"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "critic", "content": "r"}]}, "bad_role", "critic"),
        ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]},
         "bad_role_order", "alternate"),
        ({"messages": [{"role": "user", "content": "q"}]}, "missing_answer", "no assistant answer"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "images": ["http://x.org/a.jpg"]}, "remote_media", "download"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "images": ["a.jpg"], "videos": ["v.mp4"]}, "image_and_video", "not both"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "videos": ["v.mp4", "w.mp4"]}, "too_many_videos", "one video"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "user", "content": "<video>again"}, {"role": "assistant", "content": "b"}],
          "videos": ["v.mp4"]}, "bad_placeholder", "first user message"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                       {"role": "assistant", "content": "a"}]}, "bad_turn", "--from openai"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "rejected_response": "bad"}, "unsupported_field", "rejected_response"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "objects": {"ref": ["dog"], "bbox": [[1, 2, 3, 4]]}}, "unsupported_field", "objects"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "label": False}, "unsupported_field", "label"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "images": [{"bytes": "abc"}]}, "bad_media", "bytes"),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}], "system": "T"}, "bad_record", "keep one"),
        ({"messages": []}, "no_conversations", "non-empty"),
        ({"messages": [], "conversations": []}, "bad_record", "keep one"),
        ({"prompt": "q"}, "no_conversations", "'messages'"),
    ],
)
def test_sharegpt_records_that_cannot_be_converted(tmp_path, record, kind, fragment):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [good, record])
    with pytest.raises(DataError) as ei:
        sharegpt_to_internvl(src, tmp_path / "out.jsonl")
    assert (ei.value.kind, ei.value.line, ei.value.path) == (kind, 2, str(src))
    assert fragment in str(ei.value)
    stats = sharegpt_to_internvl(src, tmp_path / "out.jsonl", skip_invalid=True)
    assert (stats.written, stats.rejected) == (1, 1)
    rej = read_jsonl(stats.rejected_path)
    assert rej == [{"source": f"{src}:2", "line": 2, "kind": kind, "error": rej[0]["error"], "record": record}]


def test_sharegpt_path_rewriting(tmp_path):
    root = tmp_path / "media"
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
         "images": [str(root / "sub" / "a.jpg"), "rel/b.jpg"]},
    ])
    sharegpt_to_internvl(src, tmp_path / "out.jsonl", media_root=root)
    assert read_jsonl(tmp_path / "out.jsonl")[0]["image"] == ["sub/a.jpg", "rel/b.jpg"]
    sharegpt_to_internvl(src, tmp_path / "out2.jsonl", media_root=root, source_root=root / "sub")
    assert read_jsonl(tmp_path / "out2.jsonl")[0]["image"] == ["sub/a.jpg", "sub/rel/b.jpg"]
    sharegpt_to_internvl(src, tmp_path / "out3.jsonl", media_root=tmp_path / "elsewhere")
    assert read_jsonl(tmp_path / "out3.jsonl")[0]["image"][0] == "../media/sub/a.jpg"


# ------------------------------------------------------------------------------ openai


def test_openai_parts_and_data_urls(tmp_path):
    url = png_data_url()
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [
            {"role": "system", "content": [{"type": "text", "text": "You see."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image_url", "image_url": {"url": "file:///data/pics/b%20c.jpg"}},
                {"type": "text", "text": "Which is red?"}]},
            {"role": "assistant", "content": "The first."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Again?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Same picture."}]},
        ]},
        {"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "text"}], "system": "Sys"},
    ])
    dst = tmp_path / "sub" / "out.jsonl"
    stats = openai_to_internvl(src, dst)
    assert (stats.written, stats.images_written) == (2, 1)  # the same data URL twice -> one file
    out = read_jsonl(dst)
    first = out[0]
    decoded = first["image"][0]
    assert decoded.startswith("images/") and decoded.endswith(".png")
    assert first["image"] == [decoded, "/data/pics/b c.jpg", decoded]
    with Image.open(dst.parent / decoded) as im:
        assert im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert first["conversations"] == [
        {"from": "system", "value": "You see."},
        {"from": "human", "value": "Compare\n<image>\n<image>\nWhich is red?"},
        {"from": "gpt", "value": "The first."},
        {"from": "human", "value": "<image>\nAgain?"},
        {"from": "gpt", "value": "Same picture."},
    ]
    assert out[1] == {"id": 1, "conversations": conv(("s", "Sys"), ("h", "plain"), ("g", "text"))}


def test_openai_single_image_variants_and_root(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "developer", "content": "D"},
                      {"role": "user", "content": [{"type": "image", "image": "/m/x.jpg"}, "What?"]},
                      {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "/m/v.mp4"}, {"type": "text", "text": "Q"}]},
                      {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": png_data_url((0, 0, 255))}]},
                      {"role": "assistant", "content": "blue"}]},
    ])
    stats = openai_to_internvl(src, tmp_path / "out.jsonl", media_root="/m", images_dir=tmp_path / "m_imgs",
                               keep_system=False)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0]["image"] == "x.jpg" and out[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat?"}
    assert out[1]["video"] == "v.mp4" and out[1]["conversations"][0]["value"] == "<video>\nQ"
    assert stats.images_written == 1 and len(list((tmp_path / "m_imgs").iterdir())) == 1
    assert out[2]["conversations"][0]["value"] == "<image>"


@pytest.mark.parametrize(
    "messages, kind",
    [
        ([{"role": "user", "content": "see <image>"}, {"role": "assistant", "content": "a"}], "bad_placeholder"),
        ([{"role": "user", "content": "q"},
          {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}}]}], "bad_placeholder"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
          {"role": "assistant", "content": "a"}], "bad_data_url"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
          {"role": "assistant", "content": "a"}], "unsupported_part"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
         "unsupported_role"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}], "bad_turn"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, {"role": "assistant", "content": "a"}],
         "bad_media"),
    ],
)
def test_openai_records_that_cannot_be_converted(tmp_path, messages, kind):
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as ei:
        openai_to_internvl(src, tmp_path / "out.jsonl")
    assert (ei.value.kind, ei.value.line) == (kind, 1)


def test_openai_failure_removes_decoded_images(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": "q"}]},
    ])
    with pytest.raises(DataError):
        openai_to_internvl(src, tmp_path / "out.jsonl")
    assert not any((tmp_path / "images").glob("*"))
    stats = openai_to_internvl(src, tmp_path / "out.jsonl", skip_invalid=True)
    assert (stats.written, stats.rejected, stats.images_written) == (1, 1, 1)
    assert "rejected 1 record(s)" in stats.summary()


def test_openai_rejects_sharegpt_layout(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], "images": ["a.jpg"]}])
    with pytest.raises(DataError, match="--from sharegpt"):
        openai_to_internvl(src, tmp_path / "out.jsonl")


# ------------------------------------------------------------------------------ dispatcher


def test_convert_dispatch(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"conversations": conv(("s", "S"), ("h", "q"), ("g", "a"))}]))
    assert convert(src, tmp_path / "a.jsonl", "json").written == 1
    assert read_jsonl(tmp_path / "a.jsonl")[0]["conversations"][0]["from"] == "human"  # official default: drop
    convert(src, tmp_path / "b.jsonl", "json", keep_system=True)
    assert read_jsonl(tmp_path / "b.jsonl")[0]["conversations"][0]["from"] == "system"
    convert(tmp_path / "b.jsonl", tmp_path / "c.jsonl", "jsonl")
    assert read_jsonl(tmp_path / "c.jsonl")[0]["conversations"][0]["from"] == "human"
    convert(tmp_path / "b.jsonl", tmp_path / "d.jsonl", "sharegpt", media_root=None)
    assert read_jsonl(tmp_path / "d.jsonl")[0]["conversations"][0]["from"] == "system"  # sharegpt default: keep
    with pytest.raises(DataError) as ei:
        convert(src, tmp_path / "e.jsonl", "alpaca")
    assert ei.value.kind == "bad_args" and "sharegpt" in str(ei.value)
    with pytest.raises(DataError, match="images_dir"):
        convert(src, tmp_path / "e.jsonl", "json", images_dir="x")
