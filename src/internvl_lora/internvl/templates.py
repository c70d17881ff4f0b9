"""Conversation templates and label masks, matching the official InternVL preprocessors.

`encode_conversation` turns a list of turns (image placeholders already expanded to
`<img><IMG_CONTEXT></img>`, one context token per image) into `input_ids` and `labels`, exactly as the
official preprocessor of the template would (before padding and truncation). There are two families:

* segment-wise (`internvl2_5`, `internvl3_5_gpt_oss`): every turn is rendered and tokenized on its own
  and the pieces are concatenated; the assistant header is masked by token count.
* whole-string (`Hermes-2`, `internlm2-chat`, `phi3-chat`): the whole conversation is rendered as one
  string and tokenized once; the labels are then masked by walking the sequence with token counts of
  separately tokenized pieces, with the per-preprocessor offsets of the official code. Where that walk
  does not land on the end of the sequence the official code zeroes the sample's labels ("tokenization
  mismatch"); we raise `TemplateMismatch` instead, so the data audit can report the sample.

`build_prompt` renders the generation prompt of the official `model.chat`; `parse_response` cuts a
generated text the way `model.chat` does. Templates are plain data: a table, not a registry.
See docs/templates.md for every intended difference from the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .constants import IGNORE_INDEX

SYSTEM_OLD = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_NEW = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYSTEM_OSS = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)

# How a template is tokenized and masked (one per official preprocessor).
SEGMENTS = "segments"  # preprocess_internvl2_5 / preprocess_internvl3_5_gpt_oss
MPT = "mpt"  # preprocess_mpt (Hermes-2)
INTERNLM = "internlm"  # preprocess_internlm (internlm2-chat)
PHI3 = "phi3"  # preprocess_phi3 (phi3-chat)


class TemplateMismatch(UserError):
    """The official preprocessor would not train on this sample (it zeroes its labels or fails on it).

    `reason` says why; for a length mismatch, `expected` is where the official label walk ended and
    `actual` the number of non-pad tokens of the sequence.
    """

    def __init__(self, template: str, reason: str, expected: int | None = None, actual: int | None = None):
        self.template, self.reason, self.expected, self.actual = template, reason, expected, actual
        super().__init__(f"template {template!r}: {reason}")


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str  # contains "{system_message}"
    user: str  # role header of the user turn
    assistant: str  # role header of the assistant turn (the official `roles[1]`)
    sep: str  # appended after every message
    system_message: str  # default system prompt
    stop: str  # the token that ends an assistant answer at generation time (what model.chat stops on)
    style: str = SEGMENTS  # which official preprocessor: SEGMENTS, MPT, INTERNLM or PHI3
    answer_prefix: str = ""  # text between the assistant header and the answer that the model itself writes
    final_sep: str | None = None  # separator of an assistant message that is the conversation's last message
    trailing_masked: int = 0  # SEGMENTS: tokens masked at the end of every assistant segment

    def system(self, message: str | None) -> str:
        return self.system_template.format(system_message=self.system_message if message is None else message)


TEMPLATES: dict[str, Template] = {
    "internvl2_5": Template(
        "internvl2_5", "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
        "<|im_end|>\n", SYSTEM_NEW, "<|im_end|>", style=SEGMENTS, trailing_masked=1,
    ),
    "Hermes-2": Template(
        "Hermes-2", "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
        "<|im_end|>", SYSTEM_OLD, "<|im_end|>", style=MPT,
    ),
    "internlm2-chat": Template(
        "internlm2-chat", "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
        "<|im_end|>", SYSTEM_OLD, "<|im_end|>", style=INTERNLM,
    ),
    "phi3-chat": Template(
        "phi3-chat", "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>", SYSTEM_OLD, "<|end|>",
        style=PHI3,
    ),
    "internvl3_5_gpt_oss": Template(
        "internvl3_5_gpt_oss", "<|start|>system<|message|>{system_message}", "<|start|>user<|message|>",
        "<|start|>assistant", "<|end|>", SYSTEM_OSS, "<|return|>", style=SEGMENTS,
        answer_prefix="<|channel|>final<|message|>", final_sep="<|return|>",
    ),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}") from None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of every encoded text (InternLM2, Llama)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _count(tokenizer, text: str) -> int:
    return len(_tok(tokenizer, text))


def _check_turns(turns: list[tuple[str, str]]) -> None:
    if not turns:
        raise UserError("a conversation needs at least one human turn and one gpt turn; it has no turns")
    for k, (role, text) in enumerate(turns):
        want = "human" if k % 2 == 0 else "gpt"
        if role != want:
            raise UserError(
                f"turn {k + 1} is from {role!r} but must be from {want!r}: turns alternate human/gpt, starting "
                "with human (a leading system turn goes to system_message)"
            )
        if not isinstance(text, str):
            raise UserError(f"turn {k + 1} ({role}) has a value of type {type(text).__name__}, not a string")


def encode_conversation(
    tokenizer, template: Template, turns: list[tuple[str, str]], system_message: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 = not trained) for alternating ("human", text) / ("gpt", text) turns.

    Trained tokens are each answer and the separator token that closes it, as the official
    preprocessor of `template.style` computes them. Raises `TemplateMismatch` where the official code
    would zero the sample's labels or skip it, and `UserError` for turns that do not alternate.
    """
    _check_turns(turns)
    if template.style == SEGMENTS:
        return _encode_segments(tokenizer, template, turns, system_message)
    if template.style in (MPT, INTERNLM, PHI3):
        return _encode_whole_string(tokenizer, template, turns, system_message)
    raise UserError(f"template {template.name!r} has unknown style {template.style!r}")


# --------------------------------------------------------------------------------------------------
# segment-wise: preprocess_internvl2_5 and preprocess_internvl3_5_gpt_oss


def _encode_segments(tokenizer, template: Template, turns, system_message):
    segments: list[tuple[str, str]] = [("system", template.system(system_message) + template.sep)]
    last = len(turns) - 1
    for k, (role, text) in enumerate(turns):
        if role == "human":
            segments.append((role, template.user + text + template.sep))
        else:
            end = template.final_sep if (template.final_sep is not None and k == last) else template.sep
            segments.append((role, template.assistant + template.answer_prefix + text + end))
    bos = adds_bos(tokenizer)
    # The official code measures the header by tokenizing it alone (minus the BOS in BOS mode).
    header_len = _count(tokenizer, template.assistant) - (1 if bos else 0)
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (role, text) in enumerate(segments):
        if bos and k == 0:
            text = tokenizer.bos_token + text
        ids = _tok(tokenizer, text)
        if bos:
            ids = ids[1:]  # every segment's own BOS goes; the first keeps the one written in front of it
        if role == "gpt":
            lab = list(ids)
            lab[: max(header_len, 0)] = [IGNORE_INDEX] * min(max(header_len, 0), len(lab))
            if template.trailing_masked and lab:
                n = min(template.trailing_masked, len(lab))
                lab[len(lab) - n:] = [IGNORE_INDEX] * n  # internvl2_5: the "\n" after <|im_end|>
        else:
            lab = [IGNORE_INDEX] * len(ids)
        input_ids.extend(ids)
        labels.extend(lab)
    return input_ids, labels


# --------------------------------------------------------------------------------------------------
# whole-string: preprocess_mpt, preprocess_internlm, preprocess_phi3


def _encode_whole_string(tokenizer, template: Template, turns, system_message):
    name = template.name
    if len(turns) % 2:
        raise TemplateMismatch(name, "the conversation ends with a human turn; the official preprocessor "
                                     "of this template only trains conversations that end with a gpt turn")
    system = template.system(system_message)
    messages = [text.strip() if template.style == INTERNLM else text for _, text in turns]
    for k, text in enumerate(messages):
        if not text:
            raise TemplateMismatch(name, f"turn {k + 1} is empty; the official template renders an empty message "
                                         "without its separator, which breaks the label walk")
    for marker in (template.sep, template.user, template.assistant):
        if any(marker in text for text in [system, *messages]):
            raise TemplateMismatch(name, f"a message contains the template string {marker!r}; the official "
                                         "preprocessor splits the conversation on it and mis-masks the sample")
    pairs = [(messages[i], messages[i + 1]) for i in range(0, len(messages), 2)]
    sep, user, asst = template.sep, template.user, template.assistant
    full = system + sep + "".join(user + q + sep + asst + a + sep for q, a in pairs)
    # The structural strings must occur exactly where the template put them (guards against a marker
    # formed across a message boundary), so the per-turn pieces below are what the official split gives.
    if full.count(sep) != 1 + 2 * len(pairs) or full.count(user) != len(pairs) or full.count(asst) != len(pairs):
        raise TemplateMismatch(name, "the messages form a template string across a turn boundary")

    input_ids = _tok(tokenizer, full)
    labels = list(input_ids)

    def mask(start: int, stop: int) -> None:  # Python slice semantics, like the official tensor slices
        n = len(labels[start:stop])
        labels[start:stop] = [IGNORE_INDEX] * n

    if template.style == MPT:
        cur = 0
        for k, (q, a) in enumerate(pairs):
            head = (system + sep if k == 0 else "") + user + q + sep + asst
            turn_len = _count(tokenizer, head + a) + 1  # +1: the separator the split removed
            mask(cur, cur + _count(tokenizer, head))
            cur += turn_len
    elif template.style == INTERNLM:
        cur = 1
        mask(0, 1)  # BOS
        n = _count(tokenizer, system + sep + user + pairs[0][0] + sep + asst) - 1
        mask(cur, cur + n)
        cur += n
        for k in range(1, len(pairs)):
            cur += _count(tokenizer, pairs[k - 1][1] + sep) - 1  # previous answer + separator: trained
            n = _count(tokenizer, user + pairs[k][0] + sep + asst) - 1
            mask(cur, cur + n)
            cur += n
        cur += _count(tokenizer, pairs[-1][1] + sep) - 1
    else:  # PHI3
        cur = 1
        mask(0, 1)  # BOS
        endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if endoftext is not None:
            for p, tid in enumerate(input_ids):
                if tid == endoftext:
                    labels[p] = IGNORE_INDEX
        for k, (q, a) in enumerate(pairs):
            head = (system + sep if k == 0 else "") + user + q + sep + asst
            if k == 0:
                turn_len = _count(tokenizer, head + a)
                n = _count(tokenizer, head) - 1
            else:
                turn_len = _count(tokenizer, head + a) - 1
                n = _count(tokenizer, head) - 2
            mask(cur, cur + n)
            cur += turn_len
    mask(cur, len(labels))

    pad = tokenizer.pad_token_id
    total = sum(1 for t in input_ids if t != pad) if pad is not None else len(input_ids)
    if cur != total:
        raise TemplateMismatch(
            name,
            f"tokenization mismatch: the official label walk ends at token {cur} but the sequence has {total} "
            "non-pad tokens (the official code would zero this sample's labels)",
            expected=cur, actual=total,
        )
    return input_ids, labels


# --------------------------------------------------------------------------------------------------
# inference


def build_prompt(template: Template, question: str, history: list[tuple[str, str]] | None = None,
                 system_message: str | None = None) -> str:
    """The generation prompt of the official `model.chat`: system, past (question, answer) pairs, the
    question, an open assistant turn.

    History answers are written as the model wrote them: for a template with an `answer_prefix`
    (GPT-OSS `<|channel|>final<|message|>`) the prefix is put back in front of an answer that lacks it,
    since the official chat keeps it in the answers it stores. Empty messages render as the bare role,
    as the official template does.
    """
    parts = [template.system(system_message) + template.sep]

    def add(role: str, message: str | None) -> None:
        parts.append(role + message + template.sep if message else role)

    for q, a in history or []:
        add(template.user, q)
        if a and template.answer_prefix and not a.startswith(template.answer_prefix):
            a = template.answer_prefix + a
        add(template.assistant, a)
    add(template.user, question)
    parts.append(template.assistant)
    return "".join(parts)


def parse_response(template: Template, text: str) -> str:
    """The answer in a decoded generation (special tokens kept): cut at the stop token as `model.chat`
    does, drop the answer prefix the model writes itself (GPT-OSS channel header), strip."""
    text = text.split(template.stop)[0]
    if template.answer_prefix:
        text = text.strip()
        if text.startswith(template.answer_prefix):
            text = text[len(template.answer_prefix):]
    return text.strip()
