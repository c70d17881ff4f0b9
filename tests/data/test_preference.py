"""Preference records (the official MPO format): parsing with file:line errors, the audit, encoding both
answers over one set of tiles, and objective detection."""

from __future__ import annotations

import json

import pytest

from internvl_lora.data.meta import DatasetSpec, Line
from internvl_lora.data.preference import detect_objective, parse_preference
from internvl_lora.data.records import parse_record
from internvl_lora.errors import DataError


def _line(obj, root="/data", number=3) -> Line:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return Line(0, DatasetSpec("d", root, "/data/p.jsonl"), "/data/p.jsonl", number, text)


PAIR = {"id": 1, "image": "a.png", "question": "What color?", "chosen": "red", "rejected": "blue"}


def test_a_pair_becomes_two_conversations_with_the_official_placeholder():
    pair = parse_preference(_line(PAIR))
    assert pair.chosen.turns == [("human", "<image>\nWhat color?"), ("gpt", "red")]
    assert pair.rejected.turns == [("human", "<image>\nWhat color?"), ("gpt", "blue")]
    assert pair.chosen.images == ["/data/a.png"] and pair.rejected.images == ["/data/a.png"]
    assert pair.source == ("/data/p.jsonl", 3)
    video = parse_preference(_line({"video": "v.mp4", "question": "What happens?", "chosen": "a", "rejected": "b"}))
    assert video.chosen.turns[0] == ("human", "<video>\nWhat happens?")
    text = parse_preference(_line({"question": "Hi", "chosen": "hello", "rejected": "bye"}))
    assert text.kind == "text" and text.chosen.images == []


@pytest.mark.parametrize("obj, kind, words", [
    ({**PAIR, "rejected": 3}, "bad_preference", "'rejected' must be a string"),
    ({k: v for k, v in PAIR.items() if k != "chosen"}, "bad_preference", "missing field 'chosen'"),
    ({**PAIR, "rejected": "  "}, "empty_answer", "rejected answer is empty"),
    ({**PAIR, "chosen": ""}, "empty_answer", "chosen answer is empty"),
    ({**PAIR, "rejected": "see <image>"}, "bad_placeholder", "rejected answer contains"),
    ({**PAIR, "image": ["a.png", "b.png"]}, "image_count", "0 <image> placeholder(s) for 2 image(s)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "not_preference",
     "train.objective=sft"),
    ({**PAIR, "conversations": []}, "bad_preference", "both 'conversations'"),
    ("[1, 2]", "bad_json", "JSON object"),
])
def test_bad_pairs_name_the_file_and_line(obj, kind, words):
    with pytest.raises(DataError) as e:
        parse_preference(_line(obj))
    assert e.value.kind == kind and words in str(e.value)
    assert "/data/p.jsonl:3" in str(e.value)


def test_a_pair_given_to_supervised_training_says_how_to_train_it():
    with pytest.raises(DataError) as e:
        parse_record(_line(PAIR))
    assert "train.objective=mpo" in str(e.value) and "/data/p.jsonl:3" in str(e.value)


def test_the_objective_is_detected_from_the_first_json_object():
    assert detect_objective([_line("not json"), _line(PAIR)]) == "mpo"
    assert detect_objective([_line({"conversations": []})]) == "sft"
    assert detect_objective([]) == "sft"


def test_audit_and_encoding_share_the_tiles_and_count_both_answers(demo_folder, tmp_path):
    from internvl_lora.data.audit import audit
    from internvl_lora.data.dataset import PreferenceDataset
    from internvl_lora.data.encode import EncodeSettings
    from internvl_lora.data.meta import load_meta
    from internvl_lora.data.preference import encode_preference
    from internvl_lora.data.synthetic import make_preference_dataset
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer
    from internvl_lora.internvl.constants import IGNORE_INDEX

    d = demo_folder(16, 4)
    data = make_preference_dataset(tmp_path / "p", n_train=8, n_heldout=4)
    with open(data / "train.jsonl", "a") as f:  # one bad line, one pair with the same answer twice
        f.write(json.dumps({"image": "images/none.png", "question": "q", "chosen": "red", "rejected": "blue"}) + "\n")
        f.write(json.dumps({"question": "Say yes.", "chosen": "yes", "rejected": "yes"}) + "\n")
    tok = load_tokenizer(d / "model")
    s = EncodeSettings.from_checkpoint(inspect_checkpoint(d / "model"))
    result = audit(load_meta(data / "meta.json"), tok, s, objective="mpo")
    assert [(p.kind, p.line) for p in result.problems] == [("missing_image", 9)]
    assert [w.line for w in result.warnings if w.kind == "same_answers"] == [10]
    ds = PreferenceDataset(result, tok, s, train=False)
    for i, ln in enumerate(ds.lines):
        pair = parse_preference(ln)
        enc = encode_preference(pair, tok, s)
        assert ds.lengths[i] == len(enc.chosen_ids) + len(enc.rejected_ids)
        item = ds[i]
        # the same prompt (image blocks included), then each answer
        n = len(enc.chosen_ids) - sum(1 for x in enc.chosen_labels if x != IGNORE_INDEX) - 1
        assert enc.chosen_ids[:n] == enc.rejected_ids[:n]
        if pair.chosen.images:
            assert item["pixel_values"].shape[0] == sum(item["num_tiles"])
    sft = audit(load_meta(data / "meta.json"), tok, s)  # the same file audited as supervised data
    assert {p.kind for p in sft.problems} == {"no_conversations"}
