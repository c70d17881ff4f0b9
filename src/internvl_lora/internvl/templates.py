"""Conversation templates and label masks, matching the official InternVL preprocessors.

`encode_conversation` turns a list of turns (image placeholders already expanded to
`<img><IMG_CONTEXT></img>`, one context token per image) into `input_ids` and `labels`. Trained tokens
are the assistant answers plus the closing separator token; system, user and assistant headers are
masked (-100). `build_prompt` renders a generation prompt for chat and validation.

Templates are plain data: a table, not a registry.
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


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str  # contains "{system_message}"
    user: str  # role header of the user turn
    assistant: str  # role header of the assistant turn
    sep: str  # appended after every message
    system_message: str  # default system prompt
    stop: str  # the token that ends an assistant answer at generation time

    def system(self, message: str | None) -> str:
        return self.system_template.format(system_message=self.system_message if message is None else message)


TEMPLATES: dict[str, Template] = {
    "internvl2_5": Template(
        "internvl2_5", "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
        "<|im_end|>\n", SYSTEM_NEW, "<|im_end|>",
    ),
    "Hermes-2": Template(
        "Hermes-2", "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
        "<|im_end|>", SYSTEM_OLD, "<|im_end|>",
    ),
    "internlm2-chat": Template(
        "internlm2-chat", "<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
        "<|im_end|>", SYSTEM_OLD, "<|im_end|>",
    ),
    "phi3-chat": Template(
        "phi3-chat", "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>", SYSTEM_OLD, "<|end|>",
    ),
    "internvl3_5_gpt_oss": Template(
        "internvl3_5_gpt_oss", "<|start|>system<|message|>{system_message}", "<|start|>user<|message|>",
        "<|start|>assistant<|channel|>final<|message|>", "<|end|>", SYSTEM_OSS, "<|end|>",
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


def encode_conversation(
    tokenizer, template: Template, turns: list[tuple[str, str]], system_message: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels for alternating ("human", text) / ("gpt", text) turns.

    Segment-wise like the official `preprocess_internvl2_5`: each turn is rendered and tokenized on its
    own; with a BOS-adding tokenizer the BOS string is put in front of the first segment and the
    auto-added BOS of every segment is dropped, so the sequence starts with exactly one BOS.
    For each answer the assistant header and the trailing newline of the separator are masked; the
    answer tokens and the separator token are trained.
    """
    bos = adds_bos(tokenizer)
    header_len = len(_tok(tokenizer, template.assistant)) - (1 if bos else 0)
    segments: list[tuple[str, str]] = [("system", template.system(system_message) + template.sep)]
    for role, text in turns:
        head = template.user if role == "human" else template.assistant
        segments.append((role, head + text + template.sep))
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (role, text) in enumerate(segments):
        if bos and k == 0:
            text = tokenizer.bos_token + text
        ids = _tok(tokenizer, text)
        if bos:
            ids = ids[1:]
        if role == "gpt":
            lab = [IGNORE_INDEX] * min(header_len, len(ids)) + ids[header_len:]
            # The official code masks the last token of each answer segment: the "\n" after <|im_end|>.
            # Templates whose separator has no trailing newline keep the separator token trained.
            if template.sep.endswith("\n") and lab:
                lab[-1] = IGNORE_INDEX
        else:
            lab = [IGNORE_INDEX] * len(ids)
        input_ids.extend(ids)
        labels.extend(lab)
    return input_ids, labels


def build_prompt(template: Template, question: str, history: list[tuple[str, str]] | None = None,
                 system_message: str | None = None) -> str:
    """The generation prompt: system, past (question, answer) pairs, the question, an open assistant turn."""
    parts = [template.system(system_message) + template.sep]
    for q, a in history or []:
        parts.append(template.user + q + template.sep)
        parts.append(template.assistant + a + template.sep)
    parts.append(template.user + question + template.sep)
    parts.append(template.assistant)
    return "".join(parts)
