"""Pairwise preference layouts -> the official preference format (``--from pairs``):
``{"id", "image" | "video", "question", "chosen", "rejected"}``.

Each record's layout is recognised from its keys:

* messages + chosen/rejected (LLaMA-Factory, TRL-like): ``{"messages" | "conversations": [user turn],
  "chosen": "A" | {"role": "assistant", "content": "A"} | [that message], "rejected": ..., "images": [...]}``
* TRL prompt/chosen/rejected: ``{"prompt": "..." | [messages], "chosen": ..., "rejected": ...}``, and the
  implicit-prompt form where chosen and rejected are whole conversations that differ only in the last answer
* ms-swift: ``{"messages": [user turn, assistant chosen answer], "rejected_response": "..."}``

The official format holds one question: a prompt with earlier turns (history) is rejected, naming
file:line, rather than flattened; a system prompt is rejected unless ``keep_system=False``
(``--drop-system``) drops it, listed in the summary. Media as in the ``sharegpt`` / ``openai``
converters: top-level ``images`` / ``videos`` (or ``image`` / ``video``) and image parts in the user
message, with data: URLs decoded and paths rewritten by ``source_root`` / ``media_root``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ...internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .chat import _media_list, _part_media
from .media import MediaWriter
from .stream import ConvertStats, Reject, run

_USER, _ASSISTANT, _SYSTEM = {"user", "human"}, {"assistant", "gpt", "bot", "model"}, {"system", "developer"}
LAYOUTS = ("messages + chosen/rejected", "prompt/chosen/rejected (TRL)", "messages + rejected_response (ms-swift)")
# Keys a pair's layout consumes; every other key is carried to the output unchanged.
_CONSUMED = {"messages", "conversations", "prompt", "chosen", "rejected", "rejected_response", "system",
             "images", "videos", "image", "video"}


def _message(m: Any, where: str, media: MediaWriter, images: list[str], videos: list[str]) -> tuple[str, str]:
    """(role: human / gpt / system, text) of one message; its image / video parts go to `images` / `videos`
    and become placeholders at their place."""
    if not isinstance(m, dict):
        raise Reject("bad_turn", f"{where} must be an object with 'role' and 'content'")
    role, content = m.get("role", m.get("from")), m["content"] if "content" in m else m.get("value")
    if not isinstance(role, str):
        raise Reject("bad_turn", f"{where} has no 'role' (or 'from')")
    r = role.lower()
    if r not in _USER | _ASSISTANT | _SYSTEM:
        raise Reject("bad_role", f"{where}: role {role!r} is not supported; use user, assistant or system")
    who = "human" if r in _USER else "gpt" if r in _ASSISTANT else "system"
    if isinstance(content, str):
        return who, content
    if not isinstance(content, list):
        raise Reject("bad_turn", f"{where}: 'content' must be a string or a list of parts")
    pieces = []
    for j, part in enumerate(content):
        part = {"type": "text", "text": part} if isinstance(part, str) else part
        if not isinstance(part, dict):
            raise Reject("bad_turn", f"{where}, part {j} must be an object")
        if part.get("type") in ("text", "input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise Reject("bad_turn", f"{where}, part {j}: text part without a string 'text'")
            pieces.append(part["text"])
            continue
        kind, ref = _part_media(part, 0, j)
        if who != "human":
            raise Reject("bad_placeholder", f"{where}: {kind} parts are allowed only in the user message")
        (images if kind == "image" else videos).append(media.local_path(ref, kind))
        pieces.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
    return who, "\n".join(pieces)


def _answer(value: Any, name: str, media: MediaWriter) -> str:
    """An answer given as a string, an assistant message or a list holding one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise Reject("bad_preference", f"{name!r} holds {len(value)} messages; give the one assistant answer "
                                           "(earlier turns belong in the prompt)")
        value = value[0]
    if isinstance(value, dict):
        who, value = _message(value, f"{name!r}", media, [], [])
        if who != "gpt":
            raise Reject("bad_role", f"{name!r} must be an assistant message")
    if not isinstance(value, str):
        raise Reject("bad_preference", f"{name!r} must be a string or an assistant message, got {type(value).__name__}")
    if not value.strip():
        raise Reject("empty_answer", f"the {name} answer is empty")
    for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if tag in value:
            raise Reject("bad_placeholder", f"the {name} answer contains {tag}; placeholders belong in the question")
    return value


def _split(obj: dict) -> tuple[Any, Any, Any]:
    """(prompt messages, chosen, rejected) of the record's layout; a Reject naming the layouts otherwise."""
    msgs = obj.get("messages", obj.get("conversations"))
    if obj.get("rejected_response") is not None:  # ms-swift: the chosen answer ends the messages
        if not isinstance(msgs, list) or not msgs:
            raise Reject("bad_preference", "'rejected_response' without a 'messages' list ending in the chosen answer")
        return msgs[:-1], msgs[-1], obj["rejected_response"]
    if "chosen" not in obj or "rejected" not in obj:
        raise Reject("unknown_layout", f"not a preference pair in a known layout (keys: {sorted(obj)[:12]}); "
                                       f"--from pairs reads {'; '.join(LAYOUTS)}")
    if msgs is not None and "prompt" in obj:
        raise Reject("bad_record", "record has both 'prompt' and 'messages'; keep one")
    prompt = msgs if msgs is not None else obj.get("prompt")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if prompt is None:  # TRL implicit prompt: two whole conversations that differ in the last answer
        if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1):
            raise Reject("bad_preference", "no 'prompt' or 'messages', and chosen / rejected are not whole "
                                           "conversations holding the prompt")
        if chosen[:-1] != rejected[:-1]:
            raise Reject("bad_preference", "chosen and rejected conversations differ before their last answer")
        return chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise Reject("bad_preference", "the prompt must be a string or a non-empty list of messages")
    return prompt, chosen, rejected


def _pairs_transform(media: MediaWriter, keep_system: bool, stats: ConvertStats) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        prompt, chosen, rejected = _split(obj)
        images: list[str] = []
        videos: list[str] = []
        turns = [_message(m, f"prompt message {k}", media, images, videos) for k, m in enumerate(prompt)]
        system = obj.get("system")
        if system not in (None, ""):
            turns.insert(0, ("system", system))
        if turns and turns[0][0] == "system":
            if keep_system is not False:
                raise Reject("unsupported_system", "the preference format has no system prompt; pass --drop-system "
                                                   "to drop it (listed in the summary)")
            turns = turns[1:]
            stats.system_dropped.append(f"{stats.source}:{stats.line}")
        if [who for who, _ in turns] != ["human"]:
            roles = ", ".join(who for who, _ in turns) or "none"
            raise Reject("multi_turn_prompt", f"the prompt must be one user message (the preference format holds "
                                              f"one question), got turns: {roles}; earlier turns are not flattened")
        question = turns[0][1]
        answers = {"chosen": _answer(chosen, "chosen", media), "rejected": _answer(rejected, "rejected", media)}
        for plural, singular, got, what in (("images", "image", images, "image"), ("videos", "video", videos, "video")):
            key = plural if obj.get(plural) not in (None, "", []) else singular
            listed = _media_list(obj, key, media, what)
            if listed and got:
                raise Reject("bad_record", f"{what}s given both in {key!r} and as message parts; keep one")
            got += listed
        if images and videos:
            raise Reject("image_and_video", "a record holds either images or one video, not both")
        if len(videos) > 1:
            raise Reject("too_many_videos", f"{len(videos)} videos; a record holds one video")
        n_img, n_vid = question.count(IMAGE_PLACEHOLDER), question.count(VIDEO_PLACEHOLDER)
        if images and n_img == 0 and not n_vid:
            question = (IMAGE_PLACEHOLDER + "\n") * len(images) + question
        elif videos and n_vid == 0 and not n_img:
            question = VIDEO_PLACEHOLDER + "\n" + question
        elif n_img != len(images) or n_vid != len(videos):
            raise Reject("image_count", f"the question has {n_img} {IMAGE_PLACEHOLDER} and {n_vid} "
                                        f"{VIDEO_PLACEHOLDER} tag(s) for {len(images)} image(s), {len(videos)} video(s)")
        out: dict[str, Any] = {"id": obj["id"] if "id" in obj else index}
        if images:
            out["image"] = images[0] if len(images) == 1 else images
        if videos:
            out["video"] = videos[0]
        out.update({"question": question, **answers})
        out.update({k: v for k, v in obj.items() if k not in _CONSUMED and k not in out})
        return out

    return transform


def pairs_to_preference(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    media_root: str | os.PathLike | None = None,
    source_root: str | os.PathLike | None = None,
    keep_system: bool | None = None,
    skip_invalid: bool = False,
) -> ConvertStats:
    """Pairwise preference records (layouts in the module docstring) -> official preference JSONL."""
    media = MediaWriter(Path(dst), images_dir, media_root, source_root)
    stats = ConvertStats(system_dropped_note="as --drop-system asks (the preference format has no system prompt)")
    return run(src, dst, "auto", _pairs_transform(media, keep_system, stats), skip_invalid, media, stats)
