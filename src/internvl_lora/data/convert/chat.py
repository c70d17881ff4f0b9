"""Chat-message layouts -> InternVL records: ShareGPT / "messages" (LLaMA-Factory, ms-swift) and OpenAI
chat messages with content parts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ...internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .media import MediaWriter
from .stream import ConvertStats, Reject, run

def _with_system(obj: dict, turns: list[dict], keep_system: bool) -> list[dict]:
    """The record's top-level 'system' field as the first turn; the system turn dropped unless kept."""
    system = obj.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise Reject("bad_record", "'system' must be a string")
        if turns and turns[0]["from"] == "system":
            raise Reject("bad_record", "record has both a 'system' field and a system message; keep one")
        turns = [{"from": "system", "value": system}, *turns]
    if turns and turns[0]["from"] == "system" and not keep_system:
        turns = turns[1:]
    return turns



_HUMAN = {"user", "human"}
_GPT = {"assistant", "gpt", "bot", "model"}
_SYSTEM = {"system"}
_TOOL_ROLES = {"observation", "function_call", "function", "tool", "tool_call", "tool_response", "ipython"}
# Keys holding training signal that an InternVL SFT record cannot express: reject instead of dropping.
_UNSUPPORTED_KEYS = ("audios", "objects", "tools", "rejected_response", "chosen", "rejected", "kto_tag", "label")
# Output keys owned by the converter: never copied from the input record.
_OUTPUT_KEYS = ("id", "image", "video", "conversations")


def _check_unsupported(obj: dict) -> None:
    for key in _UNSUPPORTED_KEYS:
        val = obj.get(key)
        if key in ("label", "kto_tag") and not isinstance(val, bool):
            continue  # only a true/false KTO label changes what the answer means; other labels are metadata
        if val not in (None, "", [], {}):
            raise Reject("unsupported_field", f"field {key!r} is not supported by InternVL SFT records; "
                                               f"remove it or convert the record by hand")


def _finish(
    obj: dict,
    index: int,
    turns: list[dict],
    images: list[str],
    videos: list[str],
    consumed: set[str],
) -> dict:
    """Validate roles and placeholders, then build the InternVL record."""
    if not turns:
        raise Reject("no_conversations", "no messages")
    body = turns[1:] if turns[0]["from"] == "system" else turns
    for k, t in enumerate(body):
        if t["from"] == "system":
            raise Reject("bad_role_order", "a system message is allowed only as the first message")
        expected = "human" if k % 2 == 0 else "gpt"
        if t["from"] != expected:
            raise Reject("bad_role_order", f"message {k} is from {'user' if t['from'] == 'human' else 'assistant'} "
                                            f"but {'user' if expected == 'human' else 'assistant'} was expected "
                                            "(messages must alternate user, assistant, starting with user)")
    if not body:
        raise Reject("missing_answer", "no user/assistant messages")
    if body[-1]["from"] != "gpt":
        raise Reject("missing_answer", "the last message is from the user, with no assistant answer")

    def count(tag: str, roles: set[str]) -> int:
        return sum(t["value"].count(tag) for t in turns if t["from"] in roles)

    for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if count(tag, {"gpt", "system"}):
            raise Reject("bad_placeholder", f"{tag} appears in an assistant or system message; "
                                             "InternVL expects media placeholders in user messages")
    first_human = body[0]
    n_img = count(IMAGE_PLACEHOLDER, {"human"})
    n_vid = count(VIDEO_PLACEHOLDER, {"human"})
    if images and videos:
        raise Reject("image_and_video", "InternVL records hold either images or one video, not both")
    if len(videos) > 1:
        raise Reject("too_many_videos", f"{len(videos)} videos; InternVL records hold one video")
    if images:
        if n_vid:
            raise Reject("bad_placeholder", f"{VIDEO_PLACEHOLDER} tag without a video")
        if n_img == 0:
            first_human["value"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + first_human["value"]
        elif n_img != len(images):
            raise Reject("image_count", f"{n_img} {IMAGE_PLACEHOLDER} tag(s) for {len(images)} image(s)")
    elif videos:
        if n_img:
            raise Reject("bad_placeholder", f"{IMAGE_PLACEHOLDER} tag(s) in a video record")
        if n_vid == 0:
            first_human["value"] = VIDEO_PLACEHOLDER + "\n" + first_human["value"]
        elif n_vid > 1 or VIDEO_PLACEHOLDER not in first_human["value"]:
            raise Reject("bad_placeholder", f"a video record needs exactly one {VIDEO_PLACEHOLDER}, in the first user message")
    elif n_img or n_vid:
        tag = IMAGE_PLACEHOLDER if n_img else VIDEO_PLACEHOLDER
        raise Reject("bad_placeholder", f"{n_img or n_vid} {tag} tag(s) but the record has no {'images' if n_img else 'video'}")

    out: dict[str, Any] = {"id": obj["id"] if "id" in obj else index}
    if images:
        out["image"] = images[0] if len(images) == 1 else images
    if videos:
        out["video"] = videos[0]
    out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in turns]
    for key, val in obj.items():  # carry other fields (width, height, clip, metadata...) over unchanged
        if key in consumed or key in _OUTPUT_KEYS:
            continue
        if key in _UNSUPPORTED_KEYS and not (key in ("label", "kto_tag") and not isinstance(val, bool)):
            continue  # empty (non-empty ones were rejected by _check_unsupported)
        out[key] = val
    return out


def _media_list(obj: dict, key: str, media: MediaWriter, what: str) -> list[str]:
    val = obj.get(key)
    if val in (None, ""):
        return []
    items = val if isinstance(val, list) else [val]
    out = []
    for item in items:
        if isinstance(item, dict):
            if isinstance(item.get("path"), str) and item["path"]:
                item = item["path"]
            elif item.get("bytes") is not None:
                raise Reject("bad_media", f"embedded {what} bytes are not supported; save them as files or use a data: URL")
            else:
                raise Reject("bad_media", f"{key!r} entries must be paths (or objects with a 'path'), got {item!r}")
        out.append(media.local_path(item, what))
    return out


def _sharegpt_transform(media: MediaWriter, keep_system: bool) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        _check_unsupported(obj)
        present = [k for k in ("messages", "conversations", "conversation") if obj.get(k) is not None]
        if not present:
            raise Reject("no_conversations", "no 'messages', 'conversations' or 'conversation' list")
        if len(present) > 1:
            raise Reject("bad_record", f"record has both {present[0]!r} and {present[1]!r}; keep one")
        key = present[0]
        msgs = obj[key]
        if not isinstance(msgs, list) or not msgs:
            raise Reject("no_conversations", f"{key!r} must be a non-empty list")
        turns: list[dict] = []
        if key == "conversation":  # ms-swift pairs: [{"human": q, "assistant": a}, ...]
            for k, pair in enumerate(msgs):
                if not isinstance(pair, dict):
                    raise Reject("bad_turn", f"conversation entry {k} must be an object")
                q = next((pair[r] for r in ("human", "user", "query") if r in pair), None)
                a = next((pair[r] for r in ("assistant", "gpt", "response") if r in pair), None)
                if not isinstance(q, str) or not isinstance(a, str):
                    raise Reject("bad_turn", f"conversation entry {k} needs string 'human' and 'assistant' fields")
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        else:
            for k, m in enumerate(msgs):
                if not isinstance(m, dict):
                    raise Reject("bad_turn", f"message {k} must be an object")
                role = m.get("role", m.get("from"))
                content = m["content"] if "content" in m else m.get("value")
                if not isinstance(role, str):
                    raise Reject("bad_turn", f"message {k} has no 'role' (or 'from')")
                r = role.lower()
                if r in _TOOL_ROLES:
                    raise Reject("unsupported_role", f"message {k}: role {role!r} (tool use) is not supported by InternVL templates")
                if r not in _HUMAN | _GPT | _SYSTEM:
                    raise Reject("bad_role", f"message {k}: unknown role {role!r}; use user/human, assistant/gpt or system")
                if isinstance(content, list):
                    raise Reject("bad_turn", f"message {k}: content is a list of parts; convert this file with --from openai")
                if not isinstance(content, str):
                    raise Reject("bad_turn", f"message {k} has no string 'content' (or 'value')")
                turns.append({"from": "human" if r in _HUMAN else "gpt" if r in _GPT else "system", "value": content})
        turns = _with_system(obj, turns, keep_system)
        # LLaVA-style records name the media "image" / "video" (the InternVL spelling): accept both.
        for plural, singular in (("images", "image"), ("videos", "video")):
            if obj.get(plural) not in (None, "", []) and obj.get(singular) not in (None, "", []):
                raise Reject("bad_record", f"record has both {plural!r} and {singular!r}; keep one")
        images = _media_list(obj, "images" if obj.get("images") not in (None, "", []) else "image", media, "image")
        videos = _media_list(obj, "videos" if obj.get("videos") not in (None, "", []) else "video", media, "video")
        return _finish(obj, index, turns, images, videos, {key, "system", "images", "videos"})

    return transform


def _part_media(part: dict, k: int, j: int) -> tuple[str, str]:
    """(kind, reference) of a non-text content part."""
    ptype = part.get("type")
    if ptype in ("image_url", "input_image", "video_url"):
        val = part.get(ptype, part.get("image_url"))
        if isinstance(val, dict):
            val = val.get("url")
        kind = "video" if ptype == "video_url" else "image"
    elif ptype in ("image", "video"):
        val = next((part[key] for key in (ptype, "path", "url") if isinstance(part.get(key), str)), None)
        if val is None and isinstance(part.get("base64"), str):
            val = "data:;base64," + part["base64"]
        kind = ptype
    else:
        raise Reject("unsupported_part", f"message {k}, part {j}: content type {ptype!r} is not supported "
                                          "(use text, image_url, image, video_url or video)")
    if not isinstance(val, str) or not val:
        raise Reject("bad_media", f"message {k}, part {j}: {ptype} part has no URL or path")
    return kind, val


def _openai_transform(media: MediaWriter, keep_system: bool) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        _check_unsupported(obj)
        if obj.get("images") or obj.get("videos"):
            raise Reject("bad_record", "top-level 'images'/'videos' belong to the ShareGPT layout; use --from sharegpt")
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise Reject("no_conversations", "missing or empty 'messages' list")
        turns: list[dict] = []
        images: list[str] = []
        videos: list[str] = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise Reject("bad_turn", f"message {k} must be an object")
            role = m.get("role")
            if not isinstance(role, str):
                raise Reject("bad_turn", f"message {k} has no 'role'")
            r = role.lower()
            if r in _TOOL_ROLES or m.get("tool_calls") or m.get("function_call"):
                raise Reject("unsupported_role", f"message {k}: tool calls and tool results are not supported by InternVL templates")
            if r == "developer":
                r = "system"
            if r not in ("user", "assistant", "system"):
                raise Reject("bad_role", f"message {k}: unknown role {role!r}; use user, assistant or system")
            who = {"user": "human", "assistant": "gpt", "system": "system"}[r]
            content = m.get("content")
            if isinstance(content, str):
                pieces = [content]
                texts = [content]
            elif isinstance(content, list):
                pieces, texts = [], []
                for j, part in enumerate(content):
                    if isinstance(part, str):
                        part = {"type": "text", "text": part}
                    if not isinstance(part, dict):
                        raise Reject("bad_turn", f"message {k}, part {j} must be an object")
                    if part.get("type") in ("text", "input_text", "output_text"):
                        if not isinstance(part.get("text"), str):
                            raise Reject("bad_turn", f"message {k}, part {j}: text part without a string 'text'")
                        pieces.append(part["text"])
                        texts.append(part["text"])
                        continue
                    kind, ref = _part_media(part, k, j)
                    if who != "human":
                        raise Reject("bad_placeholder", f"message {k}: {kind} parts are allowed only in user messages")
                    if kind == "image":
                        images.append(media.local_path(ref, "image"))
                        pieces.append(IMAGE_PLACEHOLDER)
                    else:
                        videos.append(media.local_path(ref, "video"))
                        pieces.append(VIDEO_PLACEHOLDER)
            else:
                raise Reject("bad_turn", f"message {k}: 'content' must be a string or a list of parts")
            for t in texts:
                for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                    if tag in t:
                        raise Reject("bad_placeholder", f"message {k}: text contains a literal {tag}; in this layout "
                                                         "images are content parts, not tags")
            turns.append({"from": who, "value": "\n".join(pieces)})
        turns = _with_system(obj, turns, keep_system)
        return _finish(obj, index, turns, images, videos, {"messages", "system"})

    return transform


def sharegpt_to_internvl(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    media_root: str | os.PathLike | None = None,
    source_root: str | os.PathLike | None = None,
    keep_system: bool = True,
    skip_invalid: bool = False,
) -> ConvertStats:
    """ShareGPT / messages layouts (LLaMA-Factory, ms-swift) -> InternVL JSONL.

    Accepted records (a JSON list or JSONL, detected from the first character):

    * ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}], "images": [...], "videos": [...]}``
    * ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "...", "images": [...]}``
    * ms-swift pairs: ``{"system": "...", "conversation": [{"human": "...", "assistant": "..."}]}``

    ``<image>`` / ``<video>`` tags are kept; with no tag at all, one ``<image>\\n`` per image (or
    ``<video>\\n``) is put in front of the first user message. One image -> ``"image": "path"``,
    several -> a list; one video -> ``"video"``. ``source_root`` resolves relative input paths;
    ``media_root`` rewrites absolute paths relative to it (use it as the meta file's ``root``).
    """
    media = MediaWriter(Path(dst), None, media_root, source_root)
    return run(src, dst, "auto", _sharegpt_transform(media, keep_system), skip_invalid, media)


def openai_to_internvl(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    media_root: str | os.PathLike | None = None,
    source_root: str | os.PathLike | None = None,
    keep_system: bool = True,
    skip_invalid: bool = False,
) -> ConvertStats:
    """OpenAI chat messages -> InternVL JSONL.

    ``{"messages": [{"role": ..., "content": "text" | [{"type": "text", "text": ...},
    {"type": "image_url", "image_url": {"url": "path, file:// or data: URL"}}]}]}``

    Each image part becomes ``<image>`` at its position; parts of one message are joined with
    ``\\n``. data: URLs are decoded to ``images_dir`` (default: ``images/`` next to DST), named by
    content hash, and referenced relative to DST's folder (or to ``media_root``).
    """
    media = MediaWriter(Path(dst), images_dir, media_root, source_root)
    return run(src, dst, "auto", _openai_transform(media, keep_system), skip_invalid, media)
