"""Conversation templates and label masks against the official InternVL preprocessors, on real tokenizers.

The ground truth is a small reference written in this file that follows the official algorithms step by
step (internvl_chat/internvl/train/dataset.py: preprocess_internvl2_5, preprocess_mpt,
preprocess_internlm, preprocess_phi3; internvl_chat_gpt_oss/.../dataset.py:
preprocess_internvl3_5_gpt_oss; conversation.py MPT / MPT_TWO prompt building): build the prompt string
like the official template, split it like the official code, tokenize each piece on its own, walk the
offsets, and zero the labels on a "tokenization mismatch". The implementation under test is structured
differently (from the turn list), so agreement on many generated conversations is evidence for both.

Tokenizers: the real InternVL tokenizer files under shared/fixtures/real (Qwen2 / Qwen2.5 BPE through
transformers; the InternLM2 sentencepiece model through a minimal wrapper that behaves like the slow
InternLM2Tokenizer the official code ran with). There is no real Phi-3 or GPT-OSS tokenizer in the
fixtures: phi3-chat runs on a Phi-3-like wrapper of the same sentencepiece model, GPT-OSS on the Qwen2.5
BPE with the harmony special tokens added.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from internvl_lora.errors import UserError
from internvl_lora.internvl.constants import IGNORE_INDEX, SPECIAL_TOKENS
from internvl_lora.internvl.templates import (
    TEMPLATES,
    TemplateMismatch,
    adds_bos,
    build_prompt,
    encode_conversation,
    get_template,
    parse_response,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real"
IGN = IGNORE_INDEX
IMG = "<img><IMG_CONTEXT></img>"

# The official strings, typed again here (not imported) so the template table is checked against them.
S_OLD = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
S_NEW = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
S_OSS = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
         "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
         "message.")

HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real tokenizer fixtures missing: {path} (see shared/fixtures/real/SOURCES.md)")
    return path


# --------------------------------------------------------------------------------------------------
# tokenizers


_TMP = tempfile.mkdtemp(prefix="internvl-tok-")
atexit.register(shutil.rmtree, _TMP, True)


def _hf_dir(name: str, files: dict[str, Path]) -> str:
    """A folder holding only tokenizer files (symlinks), so no config.json with remote code is seen."""
    d = Path(_TMP) / name
    d.mkdir(exist_ok=True)
    for fname, src in files.items():
        link = d / fname
        if not link.exists():
            os.symlink(_need(src), link)
    return str(d)


@functools.lru_cache(maxsize=None)
def hf_tokenizer(which: str):
    from transformers import AutoTokenizer

    tok_files = ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"]
    if which in ("InternVL2-1B", "InternVL2_5-1B-MPO"):
        src = FIXTURES / which
        files = {f: src / f for f in tok_files}
    elif which == "InternVL3-2B":
        # InternVL3-2B ships only its tokenizer_config/special_tokens_map; the BPE is the 2.5 one.
        files = {f: FIXTURES / "InternVL3-2B" / f for f in ["tokenizer_config.json", "special_tokens_map.json"]}
        files.update({f: FIXTURES / "InternVL2_5-1B-MPO" / f for f in ["vocab.json", "merges.txt"]})
    elif which in ("Qwen2.5", "gpt-oss-like"):
        src = FIXTURES / "Qwen2.5-Instruct-tokenizer"
        files = {f: src / f for f in ["tokenizer_config.json", "vocab.json", "merges.txt"]}
    else:
        raise KeyError(which)
    tok = AutoTokenizer.from_pretrained(_hf_dir(which, files))
    if which == "Qwen2.5":
        tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)  # what the official finetune script does
    if which == "gpt-oss-like":
        tok.add_tokens(HARMONY_TOKENS + SPECIAL_TOKENS, special_tokens=True)
    return tok


class SPTokenizer:
    """A minimal stand-in for a slow sentencepiece tokenizer of transformers 4.37 (what the official code ran).

    Like `PreTrainedTokenizer.tokenize`: the text is first split on the added tokens (longest match first);
    a token with rstrip eats the whitespace on its right; every other chunk goes to sentencepiece on its
    own; `add_special_tokens` puts the BOS in front. `llama_prefix` adds the non-legacy LlamaTokenizer
    behaviour of Phi-3 (a "▁" in front of the text, dropped only before a token of `all_special`).
    """

    def __init__(self, model_file: Path, added: dict[str, int], *, bos="<s>", eos="</s>", pad="</s>",
                 unk="<unk>", rstrip=frozenset(), llama_prefix=False, all_special=None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.added = dict(added)
        self.id_to_added = {v: k for k, v in self.added.items()}
        self.rstrip = set(rstrip)
        self.llama_prefix = llama_prefix
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos, eos, pad, unk
        self.bos_token_id = self.convert_tokens_to_ids(bos)
        self.eos_token_id = self.convert_tokens_to_ids(eos)
        self.pad_token_id = self.convert_tokens_to_ids(pad)
        self.add_bos_token = True
        self.all_special = set(all_special if all_special is not None else self.added)
        alternation = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._split = re.compile(f"({alternation})")

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    def tokenize_ids(self, text: str) -> list[int]:
        if self.llama_prefix:
            text = " " + text.replace("▁", " ")
        chunks = self._split.split(text)
        for k, chunk in enumerate(chunks):
            if chunk in self.added and chunk in self.rstrip and k + 1 < len(chunks) and chunks[k + 1]:
                if k % 2 == 1:
                    chunks[k + 1] = chunks[k + 1].lstrip()
        out: list[tuple[int, bool]] = []
        for k, chunk in enumerate(chunks):
            if not chunk:
                continue
            if k % 2 == 1:
                out.append((self.added[chunk], True))
            else:
                out.extend((i, False) for i in self.sp.encode(chunk))
        if self.llama_prefix and len(out) > 1 and out[0] == (self.sp.piece_to_id("▁"), False):
            nxt = self.id_to_added.get(out[1][0]) if out[1][1] else None
            if nxt in self.all_special:
                out = out[1:]
        return [i for i, _ in out]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.tokenize_ids(text)
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids) -> str:
        out, run = [], []
        for i in ids:
            if i in self.id_to_added:
                out.append(self.sp.decode(run))
                run = []
                out.append(self.id_to_added[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


def _internlm2_added() -> dict[str, int]:
    import json

    cfg = json.loads(_need(FIXTURES / "InternVL2-2B" / "tokenizer_config.json").read_text())
    return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}


@functools.lru_cache(maxsize=None)
def internlm2_tokenizer() -> SPTokenizer:
    """The InternVL2-2B tokenizer as the official (slow, remote-code) InternLM2Tokenizer behaves."""
    return SPTokenizer(_need(FIXTURES / "InternVL2-2B" / "tokenizer.model"), _internlm2_added())


PHI3_TOKENS = {"<|endoftext|>": 92553, "<|assistant|>": 92554, "<|system|>": 92555, "<|end|>": 92556,
               "<|user|>": 92557}


@functools.lru_cache(maxsize=None)
def phi3_like_tokenizer(quirks: bool = True) -> SPTokenizer:
    """Phi-3's tokenizer is a Llama sentencepiece model in non-legacy mode whose chat tokens eat the
    whitespace on their right and are not in `all_special_tokens`; pad = `<|endoftext|>`. We have no Phi-3
    files, so the InternLM2 model stands in, with those behaviours switched on (`quirks`) or off."""
    added = {k: v for k, v in _internlm2_added().items() if k in ("<unk>", "<s>", "</s>", *SPECIAL_TOKENS)}
    added.update(PHI3_TOKENS)
    return SPTokenizer(
        _need(FIXTURES / "InternVL2-2B" / "tokenizer.model"), added, eos="<|endoftext|>", pad="<|endoftext|>",
        rstrip={"<|assistant|>", "<|system|>", "<|end|>", "<|user|>"} if quirks else set(),
        llama_prefix=quirks, all_special={"<s>", "</s>", "<unk>", "<|endoftext|>"},
    )


def get_tok(which: str):
    if which == "InternVL2-2B":
        return internlm2_tokenizer()
    if which == "phi3-like":
        return phi3_like_tokenizer(True)
    if which == "phi3-plain":
        return phi3_like_tokenizer(False)
    return hf_tokenizer(which)


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


# --------------------------------------------------------------------------------------------------
# the official algorithms, written step by step (the reference)


def _set_ignore(target: list[int], start: int, stop: int | None = None) -> None:
    """`target[start:stop] = IGNORE` with Python/torch slice semantics (negative stops count from the end)."""
    for p in range(*slice(start, stop).indices(len(target))):
        target[p] = IGN


class Zeroed(Exception):
    """The official preprocessor zeroed the labels ("tokenization mismatch") or crashed on the sample."""


def _mpt_prompt(system_template, system_message, roles, sep, messages, sep2=None):
    """conversation.py `get_prompt` for the MPT (sep2=None) and MPT_TWO styles."""
    ret = system_template.format(system_message=system_message) + sep
    for i, (role, message) in enumerate(messages):
        if message:
            last_assistant = sep2 is not None and i == len(messages) - 1 and role == roles[1]
            ret += role + message + (sep2 if last_assistant else sep)
        else:
            ret += role
    return ret


OLD_TEMPLATES = {  # name: (system_template, roles, sep)
    "Hermes-2": ("<|im_start|>system\n{system_message}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n{system_message}", ("<|im_start|>user\n", "<|im_start|>assistant\n"),
                       "<|im_end|>"),
    "phi3-chat": ("<|system|>\n{system_message}", ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
}


def official_old(name: str, tok, source: list[dict]) -> tuple[list[int], list[int]]:
    """preprocess_mpt / preprocess_internlm / preprocess_phi3 for one sample, no padding or truncation.

    A leading system turn becomes the system message (officially a KeyError; our documented extension).
    """
    system_template, roles, sep = OLD_TEMPLATES[name]
    system_message = S_OLD
    if source and source[0]["from"] == "system":
        system_message, source = source[0]["value"], source[1:]
    role_of = {"human": roles[0], "gpt": roles[1]}
    if role_of[source[0]["from"]] != roles[0]:
        source = source[1:]
    messages = []
    for j, sentence in enumerate(source):
        role = role_of[sentence["from"]]
        assert role == roles[j % 2]
        value = sentence["value"]
        if name == "internlm2-chat":
            value = value.strip()
            if value[0] == "\n":  # IndexError on an empty value: the sample fails
                value = value[1:]
        messages.append((role, value))
    conversation = _mpt_prompt(system_template, system_message, roles, sep, messages)

    input_ids = ids_of(tok, conversation)
    target = list(input_ids)
    total_len = sum(1 for t in target if t != tok.pad_token_id)

    def n_tok(text):
        return len(ids_of(tok, text))

    if name == "Hermes-2":
        turns = conversation.split(sep)
        regrouped = [sep.join(turns[:3])]
        for idx in range(3, len(turns), 2):
            regrouped.append(sep.join(turns[idx:idx + 2]))
        cur_len = 0
        split_on = sep + roles[1]
        for turn in regrouped:
            if turn == "":
                break
            turn_len = n_tok(turn) + 1
            parts = turn.split(split_on)
            if len(parts) != 2:
                break
            instruction_len = n_tok(parts[0] + split_on)
            _set_ignore(target, cur_len, cur_len + instruction_len)
            cur_len += turn_len
        _set_ignore(target, cur_len)
    elif name == "phi3-chat":
        turns = conversation.split(sep)
        regrouped = [sep.join(turns[:3])]
        for idx in range(3, len(turns), 2):
            regrouped.append(sep.join(turns[idx:idx + 2]))
        cur_len = 1
        _set_ignore(target, 0, cur_len)
        endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
        target = [IGN if t == endoftext else t for t in target]
        split_on = sep + roles[1]
        for i, turn in enumerate(regrouped):
            if turn == "":
                break
            turn_len = n_tok(turn) if i == 0 else n_tok(turn) - 1
            parts = turn.split(split_on)
            if len(parts) != 2:
                break
            instruction_len = n_tok(parts[0] + split_on) - (1 if i == 0 else 2)
            _set_ignore(target, cur_len, cur_len + instruction_len)
            cur_len += turn_len
        _set_ignore(target, cur_len)
    else:  # internlm2-chat
        cur_len = 1
        _set_ignore(target, 0, cur_len)  # <s>
        parts = conversation.split(roles[1])
        length = n_tok(parts[0] + roles[1]) - 1
        _set_ignore(target, cur_len, cur_len + length)
        cur_len += length
        for index in range(1, len(parts) - 1):
            answer_part, question_part = parts[index].split(roles[0])  # ValueError unless exactly two
            cur_len += n_tok(answer_part) - 1
            length = n_tok(roles[0] + question_part + roles[1]) - 1
            _set_ignore(target, cur_len, cur_len + length)
            cur_len += length
        cur_len += n_tok(parts[-1]) - 1
        _set_ignore(target, cur_len)
    if cur_len != total_len:
        raise Zeroed(f"tokenization mismatch: {cur_len} vs. {total_len}")
    return input_ids, target


def official_segments(name: str, tok, source: list[dict], leaked_i: int | None = None):
    """preprocess_internvl2_5 and preprocess_internvl3_5_gpt_oss for one sample (no padding/truncation).

    GPT-OSS: the official code picks `<|return|>` when a leftover loop variable `i` equals the index of
    the last message; `leaked_i=None` gives the intended rule (the last message), an int emulates the bug.
    """
    oss = name == "internvl3_5_gpt_oss"
    source = list(source)
    if source[0]["from"] == "system":
        system_prompt, source = source[0]["value"], source[1:]
    else:
        system_prompt = S_OSS if oss else S_NEW
    batches, roles = [], []
    if oss:
        batches.append(f"<|start|>system<|message|>{system_prompt}<|end|>")
    else:
        batches.append(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
    roles.append("system")
    for i_msg, sentence in enumerate(source):
        value = sentence["value"]
        if sentence["from"] == "human":
            batches.append(f"<|start|>user<|message|>{value}<|end|>" if oss else f"<|im_start|>user\n{value}<|im_end|>\n")
        else:
            if oss:
                probe = i_msg if leaked_i is None else leaked_i
                end = "<|return|>" if probe == len(source) - 1 else "<|end|>"
                batches.append(f"<|start|>assistant<|channel|>final<|message|>{value}{end}")
            else:
                batches.append(f"<|im_start|>assistant\n{value}<|im_end|>\n")
        roles.append(sentence["from"])
    bos_mode = getattr(tok, "add_bos_token", False)
    if bos_mode:
        batches[0] = tok.bos_token + batches[0]
    pieces = [ids_of(tok, b) for b in batches]
    if bos_mode:
        pieces = [p[1:] for p in pieces]
    header = "<|start|>assistant" if oss else "<|im_start|>assistant\n"
    ignore_len = len(ids_of(tok, header)) - (1 if bos_mode else 0)
    input_ids, targets = [], []
    for role, piece in zip(roles, pieces):
        input_ids += piece
        if role != "gpt":
            targets += [IGN] * len(piece)
        else:
            t = list(piece)
            _set_ignore(t, 0, ignore_len)
            if not oss:
                _set_ignore(t, len(t) - 1, None)  # target[-1:]
            targets += t
    return input_ids, targets


def official(name: str, tok, source: list[dict], **kw):
    if name in OLD_TEMPLATES:
        return official_old(name, tok, source)
    return official_segments(name, tok, source, **kw)


def as_source(turns, system=None) -> list[dict]:
    src = [{"from": "system", "value": system}] if system is not None else []
    return src + [{"from": r, "value": v} for r, v in turns]


def check_same(name: str, which: str, turns, system=None):
    """Our encoding equals the official one, or we raise TemplateMismatch where it zeroes the sample."""
    tok = get_tok(which) if isinstance(which, str) else which
    template = get_template(name)
    try:
        ref = official(name, tok, as_source(turns, system))
    except (Zeroed, IndexError, ValueError) as exc:
        with pytest.raises(TemplateMismatch):
            encode_conversation(tok, template, turns, system_message=system)
        return exc
    got = encode_conversation(tok, template, turns, system_message=system)
    assert got[0] == ref[0], f"input_ids differ for {turns!r}"
    assert got[1] == ref[1], f"labels differ for {turns!r}"
    return got


# Which (template, tokenizer) pairs the official recipes actually use, plus stand-ins.
COMBOS = [
    ("internvl2_5", "InternVL2_5-1B-MPO"),
    ("internvl2_5", "InternVL3-2B"),
    ("internvl2_5", "Qwen2.5"),
    ("internvl2_5", "InternVL2-2B"),  # InternVL2.5-2B/8B: InternLM2 tokenizer (adds BOS) with internvl2_5
    ("internvl2_5", "InternVL2-1B"),
    ("Hermes-2", "InternVL2-1B"),
    ("Hermes-2", "InternVL2_5-1B-MPO"),
    ("internlm2-chat", "InternVL2-2B"),
    ("phi3-chat", "phi3-like"),
    ("internvl3_5_gpt_oss", "gpt-oss-like"),
]

HANDWRITTEN = [
    ([("human", f"{IMG}\nWhat is in the image?"), ("gpt", "A cat sitting on a mat.")], None),
    ([("human", f"{IMG}\nDescribe."), ("gpt", "Two dogs."), ("human", "What colour?"), ("gpt", "Brown and white.")],
     None),
    ([("human", "Image-1: " + IMG + "\nImage-2: " + IMG + "\nCompare them."), ("gpt", "The first is larger.")], None),
    ([("human", "Hello!"), ("gpt", "Hi! How can I help?")], "You are a terse assistant."),
    ([("human", "  padded question \n"), ("gpt", "\n answer with spaces  ")], None),
    ([("human", "你好，图片里有什么？" + IMG), ("gpt", "一只猫。🙂")], "系统提示"),
    ([("human", "Frame-1: " + IMG + "\nFrame-2: " + IMG + "\nWhat happens?"), ("gpt", "A ball rolls.")], None),
    ([("human", "Please provide the bounding box coordinate(s) of the region this sentence describes: "
                "<ref>the dog</ref>"), ("gpt", "<ref>the dog</ref><box>[[12, 34, 560, 780]]</box>")], None),
    ([("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2"), ("human", "q3"), ("gpt", "a3")], None),
    ([("human", "Code?"), ("gpt", "```python\nprint('x')\n```\n\nDone.")], ""),
    ([("human", "tabs\tand\r\nCRLF"), ("gpt", "ok\t\n")], None),
    ([("human", "1+1=?"), ("gpt", "2")], None),
]


@pytest.mark.parametrize("name,which", COMBOS)
def test_handwritten_conversations_match_official(name, which):
    for turns, system in HANDWRITTEN:
        got = check_same(name, which, turns, system)
        assert not isinstance(got, Exception) or name == "phi3-chat", f"unexpected mismatch for {turns!r}: {got}"


# --------------------------------------------------------------------------------------------------
# generated conversations

PIECES = st.sampled_from([
    " ", "  ", "\n", "\n\n", "\t", "hello", " world", "Hello", ",", ".", "!", "?", "'s", "123", "3.14", "你好", "世界",
    "，", "🙂", "é", "ß", "\u3000", IMG, IMG + "\n", "<ref>", "</ref>", "<box>", "[[1, 2, 3, 4]]", "</box>",
    "assistant", "user", "<|im_start|>", "<", "|", ">", "im_end", "<s>", "end", "system", "\r\n", "Frame-1: ",
    "<|im_end|>", "<|endoftext|>", "<|end|>", "<|return|>",
])
TEXT = st.lists(st.one_of(PIECES, st.text(alphabet="ab cé\n你1<|>", max_size=4)), max_size=6).map("".join)
NONBLANK = st.tuples(TEXT, st.sampled_from(["x", "Yes", "猫", "42", "ok.", IMG])).map(lambda p: p[0] + p[1])


@st.composite
def conversations(draw, text=TEXT, allow_trailing_human=False):
    n = draw(st.integers(1, 3))
    turns = []
    for _ in range(n):
        turns.append(("human", draw(text)))
        turns.append(("gpt", draw(text)))
    if allow_trailing_human and draw(st.booleans()):
        turns.append(("human", draw(text)))
    system = draw(st.one_of(st.none(), text))
    return turns, system


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("name,which", [c for c in COMBOS if c[0] in ("internvl2_5", "internvl3_5_gpt_oss")])
@SETTINGS
@given(data=st.data())
def test_generated_segmentwise_match_official(name, which, data):
    turns, system = data.draw(conversations(allow_trailing_human=True))
    check_same(name, which, turns, system)


@pytest.mark.parametrize("name,which", [c for c in COMBOS if c[0] in OLD_TEMPLATES] + [("phi3-chat", "phi3-plain")])
@SETTINGS
@given(data=st.data())
def test_generated_whole_string_match_official(name, which, data):
    turns, system = data.draw(conversations(text=NONBLANK))
    template = get_template(name)
    if any(m in v for _, v in turns for m in (template.sep, template.user, template.assistant)):
        return  # structural strings inside messages: covered by test_structural_strings_in_messages_raise
    check_same(name, which, turns, system)


# --------------------------------------------------------------------------------------------------
# exact strings


def test_template_table_is_the_official_one():
    t = TEMPLATES
    assert set(t) == {"internvl2_5", "Hermes-2", "internlm2-chat", "phi3-chat", "internvl3_5_gpt_oss"}
    for name in ("Hermes-2", "internlm2-chat"):
        assert (t[name].system_template, t[name].user, t[name].assistant, t[name].sep, t[name].system_message) == (
            "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>", S_OLD)
        assert t[name].stop == "<|im_end|>"
    v = t["internvl2_5"]
    assert (v.system_template, v.user, v.assistant, v.sep, v.system_message, v.stop) == (
        "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", S_NEW,
        "<|im_end|>")
    p = t["phi3-chat"]
    assert (p.system_template, p.user, p.assistant, p.sep, p.system_message, p.stop) == (
        "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>", S_OLD, "<|end|>")
    o = t["internvl3_5_gpt_oss"]
    assert (o.system_template, o.user, o.assistant, o.sep, o.final_sep, o.system_message, o.stop) == (
        "<|start|>system<|message|>{system_message}", "<|start|>user<|message|>", "<|start|>assistant", "<|end|>",
        "<|return|>", S_OSS, "<|return|>")
    assert o.answer_prefix == "<|channel|>final<|message|>"
    with pytest.raises(UserError, match="unknown template"):
        get_template("vicuna")


@pytest.mark.parametrize("name,expected", [
    ("Hermes-2", f"<|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\n"),
    ("internlm2-chat", f"<|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\n"),
    ("phi3-chat", f"<|system|>\n{S_OLD}<|end|><|user|>\nQ<|end|><|assistant|>\n"),
    ("internvl2_5", f"<|im_start|>system\n{S_NEW}<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
    ("internvl3_5_gpt_oss", f"<|start|>system<|message|>{S_OSS}<|end|><|start|>user<|message|>Q<|end|><|start|>assistant"),
])
def test_build_prompt_single_turn(name, expected):
    assert build_prompt(get_template(name), "Q") == expected


def test_build_prompt_history_and_system():
    t = get_template("internvl2_5")
    assert build_prompt(t, "Q2", history=[("Q1", "A1")], system_message="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    h = get_template("Hermes-2")
    assert build_prompt(h, "Q2", history=[("Q1", "A1")]) == (
        f"<|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")
    # official get_prompt renders an empty message as the bare role
    assert build_prompt(h, "Q2", history=[("Q1", "")], system_message="S").endswith(
        "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\n<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")
    # our build_prompt equals the reference get_prompt with history
    for name, (system_template, roles, sep) in OLD_TEMPLATES.items():
        msgs = [(roles[0], "q1"), (roles[1], "a1"), (roles[0], "q2"), (roles[1], None)]
        assert build_prompt(get_template(name), "q2", [("q1", "a1")], "S") == _mpt_prompt(
            system_template, "S", roles, sep, msgs)


def test_build_prompt_gpt_oss_history_keeps_channel_header():
    o = get_template("internvl3_5_gpt_oss")
    expected = _mpt_prompt("<|start|>system<|message|>{system_message}", S_OSS,
                           ("<|start|>user<|message|>", "<|start|>assistant"), "<|end|>",
                           [("<|start|>user<|message|>", "Q1"), ("<|start|>assistant", "<|channel|>final<|message|>A1"),
                            ("<|start|>user<|message|>", "Q2"), ("<|start|>assistant", None)], sep2="<|return|>")
    assert build_prompt(o, "Q2", history=[("Q1", "A1")]) == expected  # clean answer: header put back
    assert build_prompt(o, "Q2", history=[("Q1", "<|channel|>final<|message|>A1")]) == expected  # raw answer


def test_parse_response():
    assert parse_response(get_template("internvl2_5"), " A cat.<|im_end|>\n<|endoftext|>") == "A cat."
    assert parse_response(get_template("Hermes-2"), "A cat.<|im_end|>junk") == "A cat."
    assert parse_response(get_template("phi3-chat"), "A cat.<|end|>") == "A cat."
    assert parse_response(get_template("internvl3_5_gpt_oss"), "<|channel|>final<|message|>A cat.<|return|>") == "A cat."


def test_rendered_training_strings():
    """Decoding the ids gives back the spec's training strings (byte-level BPE decodes losslessly)."""
    q, a = f"{IMG}\nQ", "A"
    tok = get_tok("InternVL2_5-1B-MPO")
    ids, _ = encode_conversation(tok, get_template("internvl2_5"), [("human", q), ("gpt", a)])
    assert tok.decode(ids) == (f"<|im_start|>system\n{S_NEW}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                               f"<|im_start|>assistant\n{a}<|im_end|>\n")
    tok = get_tok("InternVL2-1B")
    ids, _ = encode_conversation(tok, get_template("Hermes-2"), [("human", q), ("gpt", a)])
    assert tok.decode(ids) == (f"<|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\n{q}<|im_end|>"
                               f"<|im_start|>assistant\n{a}<|im_end|>")
    tok = get_tok("InternVL2-2B")
    ids, _ = encode_conversation(tok, get_template("internlm2-chat"), [("human", " " + q + "\n"), ("gpt", a + " ")])
    assert tok.decode(ids) == (f"<s><|im_start|>system\n{S_OLD}<|im_end|><|im_start|>user\n{q}<|im_end|>"
                               f"<|im_start|>assistant\n{a}<|im_end|>")  # values stripped
    tok = get_tok("gpt-oss-like")
    turns = [("human", q), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]
    ids, _ = encode_conversation(tok, get_template("internvl3_5_gpt_oss"), turns)
    assert tok.decode(ids) == (
        f"<|start|>system<|message|>{S_OSS}<|end|><|start|>user<|message|>{q}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A1<|end|><|start|>user<|message|>Q2<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A2<|return|>")


def test_known_ids_qwen25():
    tok = get_tok("InternVL2_5-1B-MPO")
    ids, labels = encode_conversation(tok, get_template("internvl2_5"), [("human", IMG), ("gpt", "Hi")], "S")
    hi = tok("Hi", add_special_tokens=False)["input_ids"]
    # <|im_start|>=151644 system=8948 \n=198 S <|im_end|>=151645 \n ; user=872 ; <img>=151665 ... ; assistant=77091
    s = tok("S", add_special_tokens=False)["input_ids"]
    assert ids == ([151644, 8948, 198] + s + [151645, 198, 151644, 872, 198, 151665, 151667, 151666, 151645, 198,
                   151644, 77091, 198] + hi + [151645, 198])
    assert labels == [IGN] * (len(ids) - len(hi) - 2) + hi + [151645, IGN]


# --------------------------------------------------------------------------------------------------
# masking properties on real tokenizers


def _trained_runs(labels):
    runs, cur = [], []
    for p, lab in enumerate(labels):
        if lab != IGN:
            cur.append(p)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


PROPERTY_COMBOS = [
    ("internvl2_5", "InternVL2_5-1B-MPO"),
    ("internvl2_5", "InternVL2-2B"),
    ("Hermes-2", "InternVL2-1B"),
    ("internlm2-chat", "InternVL2-2B"),
    ("internvl3_5_gpt_oss", "gpt-oss-like"),
]


@pytest.mark.parametrize("name,which", PROPERTY_COMBOS)
@SETTINGS
@given(data=st.data())
def test_mask_properties(name, which, data):
    template = get_template(name)
    tok = get_tok(which)
    turns, system = data.draw(conversations(text=NONBLANK))
    try:
        ids, labels = encode_conversation(tok, template, turns, system_message=system)
    except TemplateMismatch:
        return  # compared with the official result in the tests above
    assert len(ids) == len(labels)
    assert all(lab == IGN or lab == t for lab, t in zip(labels, ids))
    answers = [v for r, v in turns if r == "gpt"]
    runs = _trained_runs(labels)
    assert len(runs) == len(answers)  # one trained run per answer, nothing else trained
    stop_ids = {tok.convert_tokens_to_ids(template.sep.strip()), tok.convert_tokens_to_ids(template.stop)}
    for k, (run, answer) in enumerate(zip(runs, answers)):
        assert ids[run[-1]] in stop_ids  # every answer's separator token is trained
        if template.final_sep and k == len(answers) - 1:
            assert ids[run[-1]] == tok.convert_tokens_to_ids(template.final_sep)
        text = tok.decode([ids[p] for p in run])
        closing = tok.decode([ids[run[-1]]])
        if name == "internlm2-chat":
            answer = answer.strip()
        full = template.answer_prefix + answer + closing
        # the trained text is the answer and its closing token (a leading piece merged into the header
        # by BPE is the only thing allowed to be missing)
        assert full.endswith(text) and not full[: len(full) - len(text)].strip(), (full, text)
    # context tokens are neither lost nor added; those of questions and the system are never trained
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    expected_ctx = sum(v.count("<IMG_CONTEXT>") for _, v in turns) + (system or "").count("<IMG_CONTEXT>")
    assert ids.count(ctx) == expected_ctx
    assert labels.count(ctx) == sum(a.count("<IMG_CONTEXT>") for a in answers)


@pytest.mark.parametrize("name,which", COMBOS)
@pytest.mark.parametrize("n", [1, 7])
def test_image_context_count_equivalence(name, which, n):
    """One <IMG_CONTEXT> per image, repeated at id level, equals tokenizing all of them: the context token
    is an added special token, so the ids around it do not depend on how many there are."""
    tok = get_tok(which)
    template = get_template(name)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    counts = [3, n]

    def turns_with(k1, k2):
        return [("human", f"<img>{'<IMG_CONTEXT>' * k1}</img>\nFirst?"), ("gpt", "One."),
                ("human", f"And <img>{'<IMG_CONTEXT>' * k2}</img> this?"), ("gpt", "Two.")]

    ids1, lab1 = encode_conversation(tok, template, turns_with(1, 1))
    idsn, labn = encode_conversation(tok, template, turns_with(*counts))
    expanded_ids, expanded_lab, seen = [], [], 0
    for t, lab in zip(ids1, lab1):
        if t == ctx:
            expanded_ids += [ctx] * counts[seen]
            expanded_lab += [lab] * counts[seen]
            seen += 1
        else:
            expanded_ids.append(t)
            expanded_lab.append(lab)
    assert seen == 2
    assert (expanded_ids, expanded_lab) == (idsn, labn)
    assert idsn.count(ctx) == sum(counts)
    # and at the plain tokenizer level
    plain = ids_of(tok, "ab<IMG_CONTEXT>cd")
    many = ids_of(tok, "ab" + "<IMG_CONTEXT>" * n + "cd")
    i = plain.index(ctx)
    assert many == plain[:i] + [ctx] * n + plain[i + 1:]


# --------------------------------------------------------------------------------------------------
# BOS handling, system turn, GPT-OSS ending


def test_bos_detection():
    assert adds_bos(get_tok("InternVL2-2B"))
    assert not adds_bos(get_tok("InternVL2_5-1B-MPO"))
    assert not adds_bos(get_tok("InternVL2-1B"))


def test_internvl2_5_with_bos_tokenizer_starts_with_one_bos():
    tok = get_tok("InternVL2-2B")
    turns = [("human", IMG + "\nq"), ("gpt", "a"), ("human", "q2"), ("gpt", "a2")]
    ids, labels = encode_conversation(tok, get_template("internvl2_5"), turns)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels[0] == IGN
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t, lab in zip(ids, labels) if lab != IGN].count(im_end) == 2


def test_system_message_default_and_custom():
    tok = get_tok("InternVL2_5-1B-MPO")
    t = get_template("internvl2_5")
    turns = [("human", "q"), ("gpt", "a")]
    default, _ = encode_conversation(tok, t, turns)
    assert tok.decode(default).startswith(f"<|im_start|>system\n{S_NEW}<|im_end|>\n")
    custom, _ = encode_conversation(tok, t, turns, system_message="Be brief.")
    assert tok.decode(custom).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    empty, _ = encode_conversation(tok, t, turns, system_message="")
    assert tok.decode(empty).startswith("<|im_start|>system\n<|im_end|>\n")
    # older templates officially cannot take a system turn; we accept it as the system message
    tok1 = get_tok("InternVL2-1B")
    ids, _ = encode_conversation(tok1, get_template("Hermes-2"), turns, system_message="Be brief.")
    assert tok1.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nq")


def test_gpt_oss_masks_only_start_assistant_and_ends_last_answer_with_return():
    tok = get_tok("gpt-oss-like")
    t = get_template("internvl3_5_gpt_oss")
    turns = [("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")]
    ids, labels = encode_conversation(tok, t, turns)
    trained = [tok.decode([ids[p] for p in run]) for run in _trained_runs(labels)]
    assert trained == ["<|channel|>final<|message|>a1<|end|>", "<|channel|>final<|message|>a2<|return|>"]
    # a conversation that ends with a human turn has no <|return|>
    ids, _ = encode_conversation(tok, t, turns + [("human", "q3")])
    assert tok.convert_tokens_to_ids("<|return|>") not in ids


def test_gpt_oss_official_return_bug_is_not_reproduced():
    """Officially the ending depends on a leftover image-loop index: with one image in the first turn
    (index 0) no answer of a 1-turn sample gets <|return|>. We end the last answer with <|return|>."""
    tok = get_tok("gpt-oss-like")
    turns = [("human", IMG + "\nq"), ("gpt", "a")]
    ours = encode_conversation(tok, get_template("internvl3_5_gpt_oss"), turns)
    buggy = official_segments("internvl3_5_gpt_oss", tok, as_source(turns), leaked_i=0)
    intended = official_segments("internvl3_5_gpt_oss", tok, as_source(turns))
    assert ours == intended and ours != buggy
    assert tok.convert_tokens_to_ids("<|end|>") == buggy[0][-1]


# --------------------------------------------------------------------------------------------------
# where the official code zeroes a sample we raise


def test_tokenization_mismatch_raises_typed_error():
    assert issubclass(TemplateMismatch, UserError)
    turns = [("human", "q"), ("gpt", "a")]
    # internlm2-chat expects a BOS at position 0; a Qwen tokenizer has none -> official mismatch
    exc = check_same("internlm2-chat", "InternVL2_5-1B-MPO", turns)
    assert isinstance(exc, Zeroed)
    with pytest.raises(TemplateMismatch) as info:
        encode_conversation(get_tok("InternVL2_5-1B-MPO"), get_template("internlm2-chat"), turns)
    assert info.value.expected is not None and info.value.expected != info.value.actual
    # a pad token inside a message is not counted by the official length check
    exc = check_same("Hermes-2", "InternVL2-1B", [("human", "q<|endoftext|>"), ("gpt", "a")])
    assert isinstance(exc, Zeroed)


def test_phi3_offsets_need_the_phi3_tokenizer_quirks():
    """The official phi3 offsets (-1/-2) assume Phi-3's tokenizer; with a plain BOS sentencepiece
    tokenizer every multi-turn sample mismatches (and is zeroed officially), single turns are fine."""
    one = [("human", "q"), ("gpt", "a")]
    two = one + [("human", "q2"), ("gpt", "a2")]
    assert not isinstance(check_same("phi3-chat", "phi3-plain", one), Exception)
    assert isinstance(check_same("phi3-chat", "phi3-plain", two), Zeroed)
    ids, labels = check_same("phi3-chat", "phi3-like", two)
    tok = get_tok("phi3-like")
    runs = [tok.decode([ids[p] for p in r]) for r in _trained_runs(labels)]
    assert runs == ["a<|end|>", "a2<|end|>"]


def test_phi3_masks_endoftext_inside_answers():
    """preprocess_phi3 masks every <|endoftext|>; with Phi-3's pad (= <|endoftext|>) such a sample also
    mismatches, so the masking only shows with a tokenizer whose pad is another token."""
    base = phi3_like_tokenizer(True)
    tok = SPTokenizer(FIXTURES / "InternVL2-2B" / "tokenizer.model", base.added, eos="</s>", pad="</s>",
                      rstrip=base.rstrip, llama_prefix=True, all_special=base.all_special)
    turns = [("human", "q"), ("gpt", "a<|endoftext|>b")]
    ids, labels = check_same("phi3-chat", tok, turns)
    eot = PHI3_TOKENS["<|endoftext|>"]
    assert eot in ids and labels[ids.index(eot)] == IGN
    assert isinstance(check_same("phi3-chat", "phi3-like", turns), Zeroed)  # real Phi-3 setting: zeroed


@pytest.mark.parametrize("name", sorted(OLD_TEMPLATES))
def test_structural_strings_in_messages_raise(name):
    t = get_template(name)
    tok = get_tok({"Hermes-2": "InternVL2-1B", "internlm2-chat": "InternVL2-2B", "phi3-chat": "phi3-like"}[name])
    for marker in (t.sep, t.user, t.assistant):
        with pytest.raises(TemplateMismatch, match="template string"):
            encode_conversation(tok, t, [("human", "q"), ("gpt", "x" + marker + "y")])
    with pytest.raises(TemplateMismatch, match="empty"):
        encode_conversation(tok, t, [("human", "q"), ("gpt", "  " if name == "internlm2-chat" else "")])
    with pytest.raises(TemplateMismatch, match="ends with a human"):
        encode_conversation(tok, t, [("human", "q"), ("gpt", "a"), ("human", "q2")])


def test_invalid_turns_raise_user_error():
    tok = get_tok("InternVL2_5-1B-MPO")
    t = get_template("internvl2_5")
    for turns in ([], [("gpt", "a")], [("human", "q"), ("human", "q")], [("system", "s"), ("human", "q")]):
        with pytest.raises(UserError):
            encode_conversation(tok, t, turns)


def test_segmentwise_accepts_empty_answers_like_official():
    check_same("internvl2_5", "InternVL2_5-1B-MPO", [("human", ""), ("gpt", "")])
    check_same("internvl3_5_gpt_oss", "gpt-oss-like", [("human", "q"), ("gpt", "")])


# --------------------------------------------------------------------------------------------------
# the fast tokenizer of the converter against the sentencepiece ground truth


def test_load_original_tokenizer_matches_sentencepiece_reference():
    ref = internlm2_tokenizer()
    fast = _fast_internlm2()
    for turns, system in HANDWRITTEN:
        _assert_same_conversation_ids(ref, fast, turns, system)


@SETTINGS
@given(data=st.data())
def test_load_original_tokenizer_generated_conversations(data):
    fast = _fast_internlm2()
    ref = internlm2_tokenizer()
    turns, system = data.draw(conversations(text=NONBLANK))
    text = "".join(v for _, v in turns) + (system or "")
    assert list(fast(text)["input_ids"]) == ref(text)["input_ids"], repr(text)
    _assert_same_conversation_ids(ref, fast, turns, system)


def _assert_same_conversation_ids(ref, fast, turns, system):
    """Both InternLM2 templates give the same ids with either tokenizer, or refuse the conversation with both."""
    for name in ("internlm2-chat", "internvl2_5"):
        try:
            want = encode_conversation(ref, get_template(name), turns, system)
        except TemplateMismatch:
            with pytest.raises(TemplateMismatch):
                encode_conversation(fast, get_template(name), turns, system)
            continue
        assert encode_conversation(fast, get_template(name), turns, system) == want, (name, turns)


def _fast_internlm2():
    from internvl_lora.internvl.format.tokenizer import load_original_tokenizer

    return _converted_internlm2(load_original_tokenizer)


@functools.lru_cache(maxsize=None)
def _converted_internlm2(loader):
    return loader(_need(FIXTURES / "InternVL2-2B"))
