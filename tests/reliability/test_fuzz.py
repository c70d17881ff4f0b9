"""Fuzzing the data path with hypothesis: arbitrary lines and bytes into `parse_record`, arbitrary records
and settings into `encode_record` (through the templates).

Only our typed errors may come out (`DataError` with a documented kind, or another `UserError`), and
every encoded sample must satisfy the invariants training relies on: ids and labels aligned and within
max_length, labels either ignored or equal to the id, trained tokens only inside answers, one image block
per image with tokens_per_tile x tiles context tokens, tiles as the official tiling counts them.
Each test is bounded (max_examples, no deadline) so the file runs in well under 30 s.
"""

from __future__ import annotations

import json
import random
import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_lora.data.audit import PROBLEM_KINDS
from internvl_lora.data.encode import EncodeSettings, encode_record, tiles_budget
from internvl_lora.data.meta import DatasetSpec, Line, decode_line
from internvl_lora.data.records import Record, parse_record
from internvl_lora.errors import DataError, UserError
from internvl_lora.internvl.constants import (
    IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, VIDEO_PLACEHOLDER,
)
from internvl_lora.internvl.templates import get_template
from internvl_lora.internvl.tiling import num_tiles

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SIZES = [(64, 64), (128, 64), (64, 200), (300, 100), (90, 90), (17, 333)]
# pieces that matter to the pipeline, mixed into random text
TOKENS = [IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, "<ref>", "</ref>", "<box>", "[[1, 2, 3, 4]]", "</box>", "<quad>",
          "<|im_end|>", "<|im_start|>", "<|end|>", "\n", " ", "assistant\n", "{system_message}", "日本語", "🙂",
          "\ud800", "\x00", IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from internvl_lora.internvl.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("fuzz")
    for k, size in enumerate(SIZES):
        Image.new("RGB", size, (k * 40, 100, 200)).save(d / f"{k}.png")
    return d, build_tokenizer()


def check_error(e: Exception) -> None:
    assert isinstance(e, UserError), f"untyped error {type(e).__name__}: {e}"
    event(f"error {getattr(e, 'kind', type(e).__name__)}")
    if isinstance(e, DataError):
        assert e.kind in PROBLEM_KINDS, e.kind
        assert e.path is not None and e.line is not None


def line_of(text: str | None, error: str | None = None, root: str = "/data") -> Line:
    return Line(0, DatasetSpec("f", root, "f.jsonl"), "f.jsonl", 3, text, error)


# --------------------------------------------------------------------------------------------- parse_record


_answer_pieces = ["red", "A cat.", "<ref>x</ref><box>[[1, 2, 3, 4]]</box>", "日本", "🙂", "<|im_end|>", "x" * 40, "ok!",
                  " and\n", "\n1."]
answers = st.one_of(*[st.lists(st.sampled_from(_answer_pieces), min_size=1, max_size=3).map("".join)] * 3,
                    st.text(max_size=10))  # mostly real answers, sometimes anything (blank included)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
texts = st.lists(st.sampled_from(TOKENS) | st.text(max_size=12), max_size=6).map("".join)
roles = st.sampled_from(["human", "gpt", "system", "user", "", "GPT"])
turn = st.fixed_dictionaries({"from": roles, "value": texts}) | json_values


@st.composite
def conversations(draw):
    """Mostly well-formed alternating turns, sometimes damaged; or anything at all."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(turn, max_size=6) | json_values)
    n = draw(st.integers(1, 3))
    out = [{"from": "system", "value": draw(texts)}] if draw(st.booleans()) else []
    for _ in range(n):
        out += [{"from": "human", "value": draw(texts)}, {"from": "gpt", "value": draw(answers)}]
    if draw(st.integers(0, 2)) == 0 and out:
        k = draw(st.integers(0, len(out) - 1))
        out[k] = draw(turn)
    return out


recordish = st.fixed_dictionaries({"conversations": conversations()}, optional={
    "id": json_values,
    "image": st.sampled_from(["a.jpg", "", "/abs/b.png"]) | st.lists(st.sampled_from(["a.jpg", "b.jpg", ""]), max_size=3)
    | json_values,
    "video": st.sampled_from(["v.mp4", "frames/", ""]) | json_values,
    "clip": st.lists(st.integers(-5, 50) | st.floats(allow_nan=False), max_size=3) | json_values,
    "width": json_values,
})


def check_record(r: Record) -> None:
    assert r.turns and len(r.turns) % 2 == 0
    assert [role for role, _ in r.turns] == ["human", "gpt"] * (len(r.turns) // 2)
    assert all(v.strip() for role, v in r.turns if role == "gpt")
    human = "".join(v for role, v in r.turns if role == "human")
    assert all(IMAGE_PLACEHOLDER not in v and VIDEO_PLACEHOLDER not in v for role, v in r.turns if role == "gpt")
    if r.video:
        assert not r.images and human.count(VIDEO_PLACEHOLDER) == 1 and VIDEO_PLACEHOLDER in r.turns[0][1]
        assert IMAGE_PLACEHOLDER not in human
    else:
        assert human.count(IMAGE_PLACEHOLDER) == len(r.images) and VIDEO_PLACEHOLDER not in human
    for marker in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN):
        assert marker not in human


@FUZZ
@given(obj=recordish)
def test_parse_record_on_record_like_json(obj):
    try:
        r = parse_record(line_of(json.dumps(obj)))
    except Exception as e:  # noqa: BLE001 - the point is which exceptions come out
        check_error(e)
        return
    event(f"record {r.kind}")
    check_record(r)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_parse_record_on_arbitrary_bytes(raw):
    text, error = decode_line(raw)
    try:
        r = parse_record(line_of(text, error))
    except Exception as e:  # noqa: BLE001
        check_error(e)
        if text is None:
            assert e.kind == "bad_encoding"
        return
    check_record(r)


@FUZZ
@given(text=st.text(alphabet=string.printable + "{}[]\":,\\日🙂", max_size=120))
def test_parse_record_on_json_ish_text(text):
    try:
        check_record(parse_record(line_of(text)))
    except Exception as e:  # noqa: BLE001
        check_error(e)


# -------------------------------------------------------------------------------------------- encode_record


questions = st.lists(st.sampled_from(["What?", "<image>", "\n", "word " * 20, "<|im_start|>", "{", "日本"])
                     | st.text(max_size=10), max_size=4).map("".join)


@st.composite
def cases(draw):
    n_turns = draw(st.integers(1, 3))
    turns = []
    for _ in range(n_turns):
        turns += [{"from": "human", "value": draw(questions)}, {"from": "gpt", "value": draw(answers)}]
    if draw(st.booleans()):
        turns.insert(0, {"from": "system", "value": draw(st.sampled_from(["Be brief.", "", "系统", "Be brief.", "{x}", "系统", IMAGE_PLACEHOLDER]))})
    obj = {"conversations": turns}
    n_images = draw(st.integers(0, 4))
    if n_images:
        images = [f"{draw(st.integers(0, len(SIZES) - 1))}.png" for _ in range(n_images)]
        if n_images == 1 and draw(st.booleans()):
            obj["image"] = images[0]  # a single image: the placeholder may be inserted
        else:
            obj["image"] = images
            first = turns[1] if turns[0]["from"] == "system" else turns[0]
            extra = draw(st.integers(-1, 1)) if draw(st.integers(0, 4)) == 0 else 0  # sometimes a wrong count
            missing = n_images - sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns if t["from"] == "human")
            first["value"] = IMAGE_PLACEHOLDER * max(0, missing + extra) + first["value"]
    s = dict(
        template=get_template(draw(st.sampled_from(["internvl2_5", "internvl2_5", "Hermes-2", "Hermes-2", "phi3-chat",
                                                    "internvl3_5_gpt_oss"]))),
        tile_size=64, tokens_per_tile=draw(st.sampled_from([1, 4, 16])),
        max_dynamic_patch=draw(st.integers(1, 12)), min_dynamic_patch=1,
        use_thumbnail=draw(st.booleans()), dynamic_image_size=draw(st.booleans()),
        max_length=draw(st.sampled_from([16, 200, 600, 4096, 4096])), truncation=draw(st.sampled_from(["drop", "cut_text"])),
        jpeg_draft=True,
    )
    return obj, s, draw(st.booleans()), draw(st.integers(0, 3) | st.none())


def answer_ends(template) -> list[str]:
    return [template.sep.rstrip("\n")] + ([template.final_sep] if template.final_sep else [])


@settings(FUZZ, max_examples=200)
@given(case=cases())
def test_encode_record_invariants(world, case):
    folder, tok = world
    obj, kw, load_pixels, dataset_patch = case
    s = EncodeSettings(**kw)
    try:
        rec = parse_record(line_of(json.dumps(obj), root=str(folder)))
        enc = encode_record(rec, tok, s, dataset_max_patch=dataset_patch, load_pixels=load_pixels,
                            rng=random.Random(0))
    except Exception as e:  # noqa: BLE001
        check_error(e)
        return
    event(f"encoded ({rec.kind}{', cut' if enc.cut else ''})")
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels) <= s.max_length
    assert all(lab == IGNORE_INDEX or lab == t for t, lab in zip(ids, labels))
    assert any(lab != IGNORE_INDEX for lab in labels)
    # tiles as the official tiling counts them, and one block of tokens_per_tile x tiles per image
    budget = tiles_budget(s, dataset_patch, len(rec.images)) if rec.images else 0
    want = [num_tiles(*Image.open(p).size, 64, budget, 1, s.use_thumbnail) if s.dynamic_image_size else 1
            for p in rec.images]
    assert enc.num_tiles == want
    ctx, start, end = (tok.convert_tokens_to_ids(t) for t in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN))
    assert ids.count(ctx) == s.tokens_per_tile * sum(enc.num_tiles)
    runs, k = [], 0
    while k < len(ids):
        if ids[k] == start:
            j = k + 1
            while j < len(ids) and ids[j] == ctx:
                j += 1
            assert j < len(ids) and ids[j] == end  # never cut inside a block
            runs.append(j - k - 1)
            k = j
        k += 1
    assert runs == [s.tokens_per_tile * n for n in enc.num_tiles]
    if load_pixels and rec.images:
        assert tuple(enc.pixel_values.shape) == (sum(enc.num_tiles), 3, 64, 64)
    # trained tokens lie inside answers: every trained run decodes to a piece of "answer + end"
    template = s.template
    answers_text = [template.answer_prefix + v + e for role, v in rec.turns if role == "gpt"
                    for v in (v, v.strip()) for e in answer_ends(template) + [""]]
    k = 0
    while k < len(labels):
        if labels[k] == IGNORE_INDEX:
            k += 1
            continue
        j = k
        while j < len(labels) and labels[j] != IGNORE_INDEX:
            j += 1
        piece = tok.decode(ids[k:j]).rstrip("\ufffd")
        assert any(piece in a for a in answers_text), (piece, answers_text)
        k = j
