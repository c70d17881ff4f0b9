"""The data tools on preference pairs: `data check` / `data inspect` (--objective, detection) and
`data convert --from pairs` (TRL, LLaMA-Factory, ms-swift layouts)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from internvl_lora.cli import app
from internvl_lora.data.convert import convert
from internvl_lora.data.meta import load_meta, read_lines
from internvl_lora.data.preference import parse_preference
from internvl_lora.data.synthetic import make_preference_dataset
from internvl_lora.errors import DataError, UserError


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(demo_folder) -> Path:
    return demo_folder(4, 2) / "model"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """meta.json of 6 generated preference pairs (single and multi-image)."""
    return make_preference_dataset(tmp_path_factory.mktemp("pref"), n_train=6, n_heldout=2) / "meta.json"


# ---------------------------------------------------------------- data check


def test_check_detects_preference_data_and_names_the_objective(model, pairs):
    result = cli("data", "check", pairs, "--model", model)
    assert result.exit_code == 0, result.output
    assert "checked as preference pairs (train.objective=mpo); objective detected from the data" in result.output
    assert "samples: 6  valid: 6" in result.output


def test_check_json_carries_the_objective(model, pairs):
    result = cli("data", "check", pairs, "--model", model, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["objective"] == "mpo" and summary["valid"] == 6


def test_check_objective_option_overrides_detection(model, pairs):
    result = cli("data", "check", pairs, "--model", model, "--objective", "sft", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.output)
    assert summary["objective"] == "sft" and summary["valid"] == 0
    assert set(summary["problems_by_kind"]) == {"no_conversations"}  # the SFT reader names the pairs as such


def test_check_supervised_data_given_objective_mpo(model, demo_folder):
    result = cli("data", "check", demo_folder(4, 2) / "data" / "meta.json", "--model", model, "--objective", "mpo")
    assert result.exit_code == 1
    assert "checked as preference pairs (train.objective=mpo); objective given by --objective" in result.output
    assert "not_preference: 4" in result.output


def test_check_rejects_an_unknown_objective(model, pairs):
    result = cli("data", "check", pairs, "--model", model, "--objective", "dpo")
    assert isinstance(result.exception, UserError)  # main() prints it as one paragraph, exit code 2
    assert "--objective must be one of sft, mpo, got 'dpo'" in str(result.exception)
    assert "--objective" in cli("data", "check", "--help").output


# ---------------------------------------------------------------- data inspect


def test_inspect_shows_shared_prompt_then_both_answers(model, pairs):
    result = cli("data", "inspect", pairs, "--model", model, "--index", "0", "--no-color")
    assert result.exit_code == 0, result.output
    record = json.loads(read_lines(load_meta(pairs))[0].text)
    out = result.output
    head, rest = out.split("## prompt (shared", 1)
    prompt, answers = rest.split("## chosen\n", 1)
    chosen, rejected = answers.split("## rejected\n", 1)
    assert "preference pair" in head and "tiles per image [" in head and "(shared)" in head
    assert prompt.count("<img><IMG_CONTEXT>x") == 1  # the image block shown once, folded as for SFT
    assert "What color" in prompt and "[[" not in prompt  # the prompt is not trained
    assert f"[[{record['chosen']}" in chosen and record["rejected"] not in chosen
    assert f"[[{record['rejected']}" in rejected


def test_inspect_json_holds_both_conversations(model, pairs):
    result = cli("data", "inspect", pairs, "--model", model, "--index", "0:2", "--json")
    assert result.exit_code == 0, result.output
    objs = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [o["index"] for o in objs] == [0, 1]
    for o in objs:
        assert o["objective"] == "mpo"
        assert len(o["chosen_input_ids"]) == len(o["chosen_labels"])
        assert len(o["rejected_input_ids"]) == len(o["rejected_labels"])
        assert any(lab != -100 for lab in o["chosen_labels"]) and any(lab != -100 for lab in o["rejected_labels"])


def test_inspect_saves_the_shared_tiles(model, pairs, tmp_path):
    result = cli("data", "inspect", pairs, "--model", model, "--index", "0", "--save-tiles", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir())[0].startswith("s0_img0_tile0")


def test_inspect_objective_sft_on_pairs_reports_the_line(model, pairs):
    result = cli("data", "inspect", pairs, "--model", model, "--objective", "sft")
    assert result.exit_code == 1
    assert "train.jsonl:1" in result.output and "preference record" in result.output


# ---------------------------------------------------------------- data convert --from pairs


def _png(path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(path)


def test_convert_pairs_all_layouts(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    src = write_jsonl(tmp_path / "in.jsonl", [
        # LLaMA-Factory / messages + chosen/rejected, answers as message or string
        {"messages": [{"role": "user", "content": "<image>What?"}], "chosen": {"role": "assistant", "content": "A"},
         "rejected": "B", "images": ["a.png"]},
        # ShareGPT turns, two images without tags
        {"conversations": [{"from": "human", "value": "Which?"}], "chosen": {"from": "gpt", "value": "left"},
         "rejected": {"from": "gpt", "value": "right"}, "images": ["a.png", "b.png"], "id": "x"},
        # TRL strings, extra field kept
        {"prompt": "Why?", "chosen": "yes", "rejected": "no", "score": 3},
        # TRL conversational with an image part given as a data: URL
        {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                 {"type": "text", "text": "Colour?"}]}],
         "chosen": [{"role": "assistant", "content": "blue"}], "rejected": [{"role": "assistant", "content": "red"}]},
        # TRL implicit prompt
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
        # ms-swift
        {"messages": [{"role": "user", "content": "<video>Q2"}, {"role": "assistant", "content": "ok"}],
         "rejected_response": "nope", "videos": ["v.mp4"]},
    ])
    stats = convert(src, tmp_path / "out.jsonl", "pairs")
    assert stats.written == 6 and stats.rejected == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0] == {"id": 0, "image": "a.png", "question": "<image>What?", "chosen": "A", "rejected": "B"}
    assert out[1] == {"id": "x", "image": ["a.png", "b.png"], "question": "<image>\n<image>\nWhich?",
                      "chosen": "left", "rejected": "right"}
    assert out[2] == {"id": 2, "question": "Why?", "chosen": "yes", "rejected": "no", "score": 3}
    assert out[3]["question"] == "<image>\nColour?" and (tmp_path / out[3]["image"]).is_file()
    assert stats.images_written == 1
    assert out[4] == {"id": 4, "question": "Q", "chosen": "good", "rejected": "bad"}
    assert out[5] == {"id": 5, "video": "v.mp4", "question": "<video>Q2", "chosen": "ok", "rejected": "nope"}


def test_converted_pairs_parse_as_preference_records(tmp_path):
    _png(tmp_path / "a.png")
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "What?"}], "chosen": "A", "rejected": "B", "images": ["a.png"]}])
    convert(src, tmp_path / "out.jsonl", "pairs")
    pair = parse_preference(read_lines(load_meta(tmp_path / "out.jsonl"))[0])
    assert pair.chosen.turns[-1] == ("gpt", "A") and pair.rejected_answer == "B"


@pytest.mark.parametrize("record, kind", [
    ({"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": "Q2"}], "chosen": "c", "rejected": "r"}, "multi_turn_prompt"),
    ({"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "c"}],
      "rejected_response": "r"}, "multi_turn_prompt"),
    ({"foo": 1}, "unknown_layout"),
    ({"prompt": "Q", "chosen": "c", "rejected": ""}, "empty_answer"),
    ({"prompt": "Q", "chosen": "<image>c", "rejected": "r"}, "bad_placeholder"),
    ({"prompt": "<image><image>Q", "chosen": "c", "rejected": "r", "images": ["a.png"]}, "image_count"),
    ({"system": "be nice", "prompt": "Q", "chosen": "c", "rejected": "r"}, "unsupported_system"),
])
def test_convert_pairs_reports_what_it_cannot_hold(tmp_path, record, kind):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok", "chosen": "c", "rejected": "r"}, record])
    with pytest.raises(DataError) as e:
        convert(src, tmp_path / "out.jsonl", "pairs")
    assert e.value.kind == kind and e.value.line == 2 and e.value.path == str(src)
    assert not (tmp_path / "out.jsonl").exists()
    stats = convert(src, tmp_path / "out.jsonl", "pairs", skip_invalid=True)
    assert stats.written == 1 and stats.rejected == 1
    rejected = json.loads(Path(stats.rejected_path).read_text())
    assert rejected["source"] == f"{src}:2" and rejected["kind"] == kind and rejected["record"] == record


def test_convert_pairs_cli_drop_system_listed_in_summary(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"system": "be nice", "prompt": "Q", "chosen": "c", "rejected": "r"}])
    result = cli("data", "convert", src, tmp_path / "out.jsonl", "--from", "pairs", "--drop-system")
    assert result.exit_code == 0, result.output
    assert "wrote 1 record(s)" in result.output
    assert "dropped the leading system turn of 1 record(s), as --drop-system asks" in result.output
    assert f"{src}:1" in result.output
    assert "pairs" in cli("data", "convert", "--help").output


def test_check_names_the_convert_command_for_unconverted_pairs(model, tmp_path):
    src = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Q", "chosen": "c", "rejected": "r"}])
    for objective in ("sft", "mpo"):
        result = cli("data", "check", src, "--model", model, "--objective", objective)
        assert result.exit_code == 1
        assert "unconverted_layout" in result.output and "--from pairs" in result.output
