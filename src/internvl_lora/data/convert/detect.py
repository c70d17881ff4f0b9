"""Recognise a record written in a layout `internvl-lora data convert` understands but the InternVL format
is not (OpenAI messages, ShareGPT role/content, ms-swift pairs, LLaVA-style "images" lists, preference pairs
of TRL / LLaMA-Factory / ms-swift), so that
`data check` and training can say which conversion to run instead of only "no 'conversations'".

Pure inspection of one parsed record; nothing here reads files or imports heavy modules.
"""

from __future__ import annotations

import os
from pathlib import Path


def _is_turn_list(value, keys: tuple[str, str]) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) for t in value) \
        and any(keys[0] in t and keys[1] in t for t in value)


def _command(path: str | os.PathLike | None, fmt: str) -> str:
    src = str(path) if path else "SRC"
    p = Path(src)
    dst = str(p.with_name(p.stem + ".internvl.jsonl")) if path else "OUT.jsonl"
    return f"internvl-lora data convert {src} {dst} --from {fmt}"


def unconverted_layout(obj: dict, path: str | os.PathLike | None = None) -> str | None:
    """A message naming the layout of `obj` and the command that converts the file, or None when `obj`
    does not look like another layout (a valid InternVL record always gives None)."""
    if "question" not in obj and (obj.get("rejected_response") is not None or {"chosen", "rejected"} <= set(obj)):
        return ("this record is a preference pair in a TRL / LLaMA-Factory / ms-swift layout, not the official "
                "preference format ('question', 'chosen', 'rejected' strings); convert the file first: "
                f"`{_command(path, 'pairs')}`")
    conv = obj.get("conversations")
    internvl_turns = _is_turn_list(conv, ("from", "value"))
    if isinstance(obj.get("messages"), list) and not internvl_turns:
        msgs = obj["messages"]
        parts = any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs)
        what = "OpenAI chat messages ('messages' with 'role'/'content'" + (" parts)" if parts else ")")
        return (f"this record is in the {what} layout, not the InternVL format (a 'conversations' list of "
                f"{{'from', 'value'}} turns); convert the file first: `{_command(path, 'openai')}`")
    if _is_turn_list(conv, ("role", "content")):
        return ("this record is in the ShareGPT layout with 'role'/'content' turns, not the InternVL format "
                f"('from'/'value' turns); convert the file first: `{_command(path, 'sharegpt')}`")
    if isinstance(obj.get("conversation"), list) and conv is None:
        return ("this record is in the ms-swift pairs layout ('conversation' of human/assistant pairs), not the "
                f"InternVL format; convert the file first: `{_command(path, 'sharegpt')}`")
    for plural, singular in (("images", "image"), ("videos", "video")):
        if obj.get(plural) not in (None, "", []) and singular not in obj:
            return (f"this record names its media in {plural!r} (LLaVA-Factory / ShareGPT style); the InternVL "
                    f"format uses {singular!r}, so the media would be ignored; convert the file first: "
                    f"`{_command(path, 'sharegpt')}`")
    return None
