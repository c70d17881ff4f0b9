"""Held-out samples for generation (internvl_lora.data.heldout): last question, history, reference, problems."""

from __future__ import annotations

import json

from internvl_lora.data.heldout import heldout_samples
from internvl_lora.data.meta import DatasetSpec, Line


def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


def lines(*objs) -> list[Line]:
    spec = DatasetSpec("a", "/data", "a.jsonl")
    return [Line(k, spec, "a.jsonl", k + 1, o if isinstance(o, str) else json.dumps(o)) for k, o in enumerate(objs)]


def test_last_question_is_asked_with_the_earlier_turns_as_history():
    system = {"from": "system", "value": "Be brief."}
    [ln] = lines({"image": "x.jpg", "conversations": [system] + turns("<image>\nQ1", "A1", "Q2", "A2")})
    samples, problems = heldout_samples([ln])
    assert not problems
    assert samples == [{"index": 0, "source": "a.jsonl:1", "question": "Q2", "history": [("<image>\nQ1", "A1")],
                        "images": ["/data/x.jpg"], "reference": "A2", "system": "Be brief."}]


def test_problems_are_returned_and_repeated_lines_count_once():
    ok = {"conversations": turns("Q", "A")}
    video = {"video": "v.mp4", "conversations": turns("<video>\nQ", "A")}
    ls = lines(ok, "{not json", video, ok)
    samples, problems = heldout_samples(ls + ls[:1])  # repeat_time repeats a line with its index
    assert [s["index"] for s in samples] == [0, 3]
    assert [(p.line, p.kind) for p in problems] == [(2, "bad_json"), (3, "unsupported")]


def test_limit():
    ls = lines(*[{"conversations": turns(f"Q{k}", f"A{k}")} for k in range(5)])
    assert [s["question"] for s in heldout_samples(ls, 2)[0]] == ["Q0", "Q1"]
    assert len(heldout_samples(ls)[0]) == len(heldout_samples(ls, 0)[0]) == 5
