"""Data tools, checkpoint conversion and validation off the happy path (issue #17): nothing printed as a
Python repr, nothing dropped without a word, a file in the wrong layout named with the command that fixes
it, an optional meta field that really is optional, a converted checkpoint the official code can load, and
the blank-image answers kept per sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_lora.data.meta import Line, load_meta
from internvl_lora.data.records import parse_record
from internvl_lora.errors import DataError


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


TURNS = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]


# ----- 1. data convert: human text, and a dropped system turn is reported per file:line -----

def test_data_convert_prints_a_summary_and_lists_dropped_system_turns(cli, tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"conversations": TURNS},
                               {"conversations": [{"from": "system", "value": "Be brief."}, *TURNS]}], indent=1))
    p = cli("data", "convert", src, tmp_path / "out.jsonl", "--from", "json")
    assert p.returncode == 0, p.stderr
    assert "ConvertStats(" not in p.stdout and "wrote 2 record(s)" in p.stdout
    second = [i + 1 for i, t in enumerate(src.read_text().splitlines()) if t.startswith(" {")][1]  # its line
    assert f"{src}:{second}" in p.stdout and "--keep-system" in p.stdout
    kept = cli("data", "convert", src, tmp_path / "kept.jsonl", "--from", "json", "--keep-system")
    assert kept.returncode == 0 and "dropped" not in kept.stdout
    assert json.loads((tmp_path / "kept.jsonl").read_text().splitlines()[1])["conversations"][0]["from"] == "system"


# ----- 2. data check on a file in a layout `data convert` reads -----

LAYOUTS = {
    "openai": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": "yo"}]}, "--from openai"),
    "openai_text": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                    "--from openai"),
    "sharegpt": ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                 "--from sharegpt"),
    "swift": ({"conversation": [{"human": "hi", "assistant": "yo"}]}, "--from sharegpt"),
    "llava": ({"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
               "images": ["a.jpg"]}, "--from sharegpt"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unconverted_layout_names_the_convert_command(tmp_path, layout):
    record, option = LAYOUTS[layout]
    path = _write_jsonl(tmp_path / f"{layout}.jsonl", [record])
    spec = load_meta(path)[0]
    with pytest.raises(DataError) as e:
        parse_record(Line(0, spec, str(path), 1, json.dumps(record)))
    assert e.value.kind == "unconverted_layout" and e.value.line == 1
    assert f"`internvl-lora data convert {path} " in str(e.value) and str(e.value).endswith(f"{option}`")


def test_data_check_on_openai_messages_says_how_to_convert(cli, demo, tmp_path):
    record, _ = LAYOUTS["openai"]
    path = _write_jsonl(tmp_path / "chat.jsonl", [record, record])
    p = cli("data", "check", path, "--model", demo / "model")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{path}:1" in p.stdout and f"internvl-lora data convert {path} " in p.stdout
    assert "--from openai" in p.stdout


# ----- 3. meta `root` is optional: the annotation file's folder -----

def test_meta_root_is_optional_and_defaults_to_the_annotation_folder(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _write_jsonl(sub / "train.jsonl", [{"conversations": TURNS, "image": "a.jpg"}])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"no_root": {"annotation": "sub/train.jsonl"},
                                "with_root": {"root": "imgs", "annotation": "sub/train.jsonl"}}))
    specs = load_meta(meta)
    assert not specs.problems, [str(p) for p in specs.problems]
    by_name = {s.name: s for s in specs}
    assert Path(by_name["no_root"].root) == sub
    assert Path(by_name["with_root"].root) == tmp_path / "imgs"
    record = parse_record(Line(0, by_name["no_root"], str(sub / "train.jsonl"), 1,
                               (sub / "train.jsonl").read_text().strip()))
    assert Path(record.images[0]) == sub / "a.jpg"


# ----- 4. convert --to original: the remote code makes the round trip, or the conversion is refused -----

def test_convert_to_original_keeps_or_asks_for_the_remote_code(cli, demo, tmp_path):
    from internvl_lora.internvl.format.save import convert_checkpoint

    refused = cli("convert", demo / "model", tmp_path / "orig", "--to", "original")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--reference ORIGINAL_CHECKPOINT" in refused.stderr and not (tmp_path / "orig").exists()

    original = convert_checkpoint(demo / "model", tmp_path / "orig", "original", without_code=True)
    code = "# the remote code of a released checkpoint\n"
    (original / "modeling_internvl_chat.py").write_text(code)
    hf = cli("convert", original, tmp_path / "hf", "--to", "hf")
    assert hf.returncode == 0, hf.stderr
    assert (tmp_path / "hf" / "original_code" / "modeling_internvl_chat.py").read_text() == code
    back = cli("convert", tmp_path / "hf", tmp_path / "orig2", "--to", "original")
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "orig2" / "modeling_internvl_chat.py").read_text() == code


# ----- 5. validate --blank-images keeps every blanked answer -----

def test_blank_image_answers_are_kept_per_sample(demo, tmp_path):
    from internvl_lora.validate import validate

    out = tmp_path / "val"
    validate(str(demo / "model"), str(demo / "model"), str(demo / "data" / "heldout_meta.json"), str(out),
             batch_size=2, max_new_tokens=2, limit=2, blank_images=True)
    rows = json.loads((out / "validation.json").read_text())["samples"]
    assert len(rows) == 2
    assert all(isinstance(r["blank_answer"], str) and "exact_match" in r["blank_score"] for r in rows)
    html = (out / "report.html").read_text()
    assert html.count("Tuned, images blanked</th>") == 2
