"""Convert and clean annotation files into the official InternVL JSONL format.

Four input formats (``convert(src, dst, fmt)``):

* ``json``     - a JSON list of InternVL records; same result as the official ``tools/json2jsonl.py``.
* ``jsonl``    - an InternVL JSONL file; same result as the official ``tools/jsonl2jsonl.py``.
* ``sharegpt`` - the ShareGPT / "messages" layouts of LLaMA-Factory and ms-swift.
* ``openai``   - OpenAI chat messages with content parts (text, image_url with a path or a data: URL).

Every converter writes one ``json.dumps(record, ensure_ascii=False)`` per line and returns a
`ConvertStats`. Input that is not valid JSON, and records that cannot be converted, raise a
`DataError` naming the file and the 1-based line; with ``skip_invalid=True`` bad records go to
``<dst stem>.rejected.jsonl`` instead (one line each: source line, kind, message, original record)
and the counts are returned. Nothing is dropped silently. Output is written to a temporary file
and moved into place only when the conversion succeeds, so a failed run leaves no half-written DST.

See docs/data-convert.md for the exact rules.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import io
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError
from ..internvl.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

__all__ = [
    "FORMATS",
    "ConvertStats",
    "convert",
    "json_to_jsonl",
    "jsonl_to_jsonl",
    "sharegpt_to_internvl",
    "openai_to_internvl",
    "rejected_path_for",
]

FORMATS = ("json", "jsonl", "sharegpt", "openai")

_CHUNK = 1 << 20  # bytes read at a time when streaming a JSON list


@dataclass
class ConvertStats:
    """What a conversion did."""

    written: int = 0
    rejected: int = 0
    dst: str = ""
    rejected_path: str | None = None  # set only when at least one record was rejected
    images_written: int = 0  # files decoded from data: URLs (openai / sharegpt)

    def summary(self) -> str:
        text = f"wrote {self.written} record(s) to {self.dst}"
        if self.images_written:
            text += f", decoded {self.images_written} image file(s)"
        if self.rejected:
            text += f"; rejected {self.rejected} record(s), listed in {self.rejected_path}"
        return text


class _Reject(Exception):
    """A record that cannot be converted (kind, message)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _with_system(obj: dict, turns: list[dict], keep_system: bool) -> list[dict]:
    """The record's top-level 'system' field as the first turn; the system turn dropped unless kept."""
    system = obj.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise _Reject("bad_record", "'system' must be a string")
        if turns and turns[0]["from"] == "system":
            raise _Reject("bad_record", "record has both a 'system' field and a system message; keep one")
        turns = [{"from": "system", "value": system}, *turns]
    if turns and turns[0]["from"] == "system" and not keep_system:
        turns = turns[1:]
    return turns


@dataclass
class _Bad:
    """An input line that is not a JSON value (JSONL only)."""

    kind: str
    message: str
    raw: str


# --------------------------------------------------------------------------------------------
# Reading


def _open_check(src: str | os.PathLike) -> Path:
    path = Path(src)
    if not path.exists():
        raise DataError("missing_file", "input file not found", path=str(path))
    if path.is_dir():
        raise DataError("missing_file", "input is a folder; give a .json or .jsonl file", path=str(path))
    return path


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a top-level JSON list as (1-based start line, value).

    Reads the file in chunks, so memory stays bounded by the largest single record.
    """
    decoder = json.JSONDecoder()
    bdec = codecs.getincrementaldecoder("utf-8-sig")()
    name = str(path)
    with open(path, "rb") as f:
        buf = ""
        pos = 0
        line = 1  # line number at buf[pos]
        eof = False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            try:
                text = bdec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                bad_line = line + buf.count("\n", pos) + chunk[: max(e.start, 0)].count(b"\n")
                raise DataError("bad_encoding", f"file is not valid UTF-8 ({e.reason})", path=name, line=bad_line) from None
            if not chunk:
                eof = True
            buf = buf[pos:] + text
            pos = 0
            return True

        def skip_ws() -> str:
            """Advance past whitespace; return the next char ('' at end of file)."""
            nonlocal pos, line
            while True:
                n = len(buf)
                while pos < n and buf[pos] in " \t\r\n":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < n:
                    return buf[pos]
                if not fill():
                    return ""

        def fail(msg: str, at_line: int | None = None) -> DataError:
            return DataError("bad_json", msg, path=name, line=at_line if at_line is not None else line)

        first = skip_ws()
        if first == "":
            raise fail("the file is empty; expected a JSON list of records")
        if first != "[":
            hint = " (it looks like JSONL or a single object: use --from jsonl)" if first == "{" else ""
            raise fail(f"expected a JSON list of records starting with '[', found {first!r}{hint}")
        pos += 1
        expect_value = False  # True right after a comma
        while True:
            c = skip_ws()
            if c == "":
                raise fail("unexpected end of file inside the list (missing ']')")
            if c == "]":
                if expect_value:
                    raise fail("trailing comma before ']'")
                pos += 1
                if skip_ws() != "":
                    raise fail("extra data after the closing ']'")
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if fill():
                        continue
                    raise fail(f"not valid JSON: {e.msg} (column {e.colno})", line + buf.count("\n", pos, e.pos)) from None
                if end == len(buf) and fill():
                    continue  # the value may continue in the next chunk (e.g. a number)
                break
            start_line = line
            line += buf.count("\n", pos, end)
            pos = end
            yield start_line, value
            c = skip_ws()
            if c == ",":
                pos += 1
                expect_value = True
            elif c == "]":
                expect_value = False
            elif c == "":
                raise fail("unexpected end of file inside the list (missing ']')")
            else:
                raise fail(f"expected ',' or ']' between records, found {c!r}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line, value or _Bad) for every non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, _Bad("bad_encoding", f"line is not valid UTF-8 ({e.reason} at byte {e.start})",
                                   raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                hint = ""
                if number == 1 and text.strip() in ("[", "{"):
                    hint = " (this looks like a pretty-printed JSON file: use --from json)"
                yield number, _Bad("bad_json", f"not valid JSON: {e.msg} (column {e.colno}){hint}", text.rstrip("\r\n"))
                continue
            yield number, value


def _sniff_array(path: Path) -> bool:
    """True when the first non-blank character of the file is '[' (a JSON list), else JSONL."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head:
            stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return stripped[:1] == b"["
            head = f.read(4096)
    return False


def _iter_records(path: Path, layout: str) -> Iterator[tuple[int, Any]]:
    if layout == "array" or (layout == "auto" and _sniff_array(path)):
        return _iter_json_array(path)
    return _iter_jsonl(path)


# --------------------------------------------------------------------------------------------
# Writing


def rejected_path_for(dst: str | os.PathLike) -> Path:
    """Where rejected records go: ``out.jsonl`` -> ``out.rejected.jsonl``."""
    dst = Path(dst)
    name = dst.name[: -len(".jsonl")] if dst.name.endswith(".jsonl") else dst.name
    return dst.with_name(name + ".rejected.jsonl")


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


class _MediaWriter:
    """Decodes data: URLs into image files (named by content hash) and rewrites media paths."""

    def __init__(self, dst: Path, images_dir: str | os.PathLike | None,
                 media_root: str | os.PathLike | None, source_root: str | os.PathLike | None):
        self.dst_dir = dst.resolve().parent
        self.images_dir = Path(images_dir).resolve() if images_dir is not None else self.dst_dir / "images"
        self.media_root = Path(media_root).resolve() if media_root is not None else None
        self.source_root = Path(source_root) if source_root is not None else None
        self.created: list[Path] = []

    def rewrite(self, path: str) -> str:
        """Apply source_root / media_root to a local path taken from the input."""
        p = path
        if self.source_root is not None and not os.path.isabs(p):
            p = str(self.source_root / p)
        if self.media_root is not None and os.path.isabs(p):
            try:
                p = os.path.relpath(os.path.abspath(p), self.media_root)
            except ValueError:  # another drive on Windows: keep absolute
                pass
        return p

    def local_path(self, ref: str, what: str = "image") -> str:
        """A media reference from the input (path, file:// URL or data: URL) -> output path string."""
        if not isinstance(ref, str) or not ref.strip():
            raise _Reject("bad_media", f"{what} reference must be a non-empty string, got {ref!r}")
        low = ref[:16].lower()
        if low.startswith("data:"):
            if what != "image":
                raise _Reject("bad_media", f"data: URLs are supported for images only, not for a {what}")
            return self._decode_data_url(ref)
        if low.startswith("file://"):
            parsed = urllib.parse.urlparse(ref)
            return self.rewrite(urllib.parse.unquote(parsed.path))
        if low.startswith(("http://", "https://", "s3://", "gs://", "oss://")):
            raise _Reject("remote_media", f"remote {what} {ref[:80]!r} is not supported; download it and give a local path")
        return self.rewrite(ref)

    _EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
            "image/gif": ".gif", "image/bmp": ".bmp", "image/tiff": ".tif"}

    def _decode_data_url(self, url: str) -> str:
        head, sep, payload = url.partition(",")
        if not sep:
            raise _Reject("bad_data_url", "data: URL has no ',' before its payload")
        params = head[5:].split(";")
        mediatype = params[0].strip().lower()
        try:
            if "base64" in (p.strip().lower() for p in params[1:]):
                data = base64.b64decode(payload.strip(), validate=False)
            else:
                data = urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise _Reject("bad_data_url", f"data: URL payload cannot be decoded ({e})") from None
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").lower()
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise _Reject("bad_data_url", f"data: URL does not hold a readable image ({type(e).__name__}: {e})") from None
        ext = self._EXT.get(mediatype) or {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "gif": ".gif",
                                            "bmp": ".bmp", "tiff": ".tif"}.get(fmt, "." + (fmt or "img"))
        name = hashlib.sha256(data).hexdigest()[:20] + ext
        target = self.images_dir / name
        if not (target.exists() and target.stat().st_size == len(data)):
            self.images_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            self.created.append(target)
        base = self.media_root if self.media_root is not None else self.dst_dir
        try:
            return os.path.relpath(target, base)
        except ValueError:
            return str(target)

    def cleanup(self) -> None:
        for p in self.created:
            try:
                p.unlink()
            except OSError:
                pass


def _run(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layout: str,
    transform: Callable[[Any, int], dict],
    skip_invalid: bool,
    media: _MediaWriter | None = None,
) -> ConvertStats:
    """Read records, transform each, write DST (and the rejected file) atomically."""
    src_path = _open_check(src)
    dst_path = Path(dst)
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise DataError("bad_args", "the output path is the input file; choose a different DST", path=str(dst_path))
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    rej_path = rejected_path_for(dst_path)
    tmp = dst_path.with_name(f".{dst_path.name}.tmp-{os.getpid()}")
    rej_tmp = rej_path.with_name(f".{rej_path.name}.tmp-{os.getpid()}")
    stats = ConvertStats(dst=str(dst_path))
    ok = False
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out, open(rej_tmp, "w", encoding="utf-8", newline="\n") as rej:
            for line, value in _iter_records(src_path, layout):
                try:
                    if isinstance(value, _Bad):
                        raise _Reject(value.kind, value.message)
                    record = transform(value, stats.written)
                except _Reject as r:
                    if not skip_invalid:
                        raise DataError(r.kind, r.message, path=str(src_path), line=line) from None
                    entry = {"source": f"{src_path}:{line}", "line": line, "kind": r.kind, "error": r.message}
                    if isinstance(value, _Bad):
                        entry["raw"] = value.raw
                    else:
                        entry["record"] = value
                    rej.write(_dump(entry))
                    stats.rejected += 1
                    continue
                out.write(_dump(record))
                stats.written += 1
        os.replace(tmp, dst_path)
        if stats.rejected:
            os.replace(rej_tmp, rej_path)
            stats.rejected_path = str(rej_path)
        else:
            rej_tmp.unlink()
            if rej_path.exists():  # stale list from an earlier run would mislead
                rej_path.unlink()
        if media is not None:
            stats.images_written = len(media.created)
        ok = True
        return stats
    finally:
        if not ok:
            for p in (tmp, rej_tmp):
                try:
                    p.unlink()
                except OSError:
                    pass
            if media is not None:
                media.cleanup()


# --------------------------------------------------------------------------------------------
# Official json2jsonl / jsonl2jsonl


def _official_clean(keep_system: bool) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise _Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        conv = obj.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise _Reject("no_conversations", "missing or empty 'conversations' list")
        if not all(isinstance(t, dict) for t in conv):
            raise _Reject("bad_turn", "every entry of 'conversations' must be an object with 'from' and 'value'")
        obj = dict(obj)
        if conv[0].get("from") == "system" and not keep_system:
            obj["conversations"] = conv[1:]
            if not obj["conversations"]:
                raise _Reject("no_conversations", "the record holds only a system turn")
        obj["id"] = index
        return obj

    return transform


def json_to_jsonl(src: str | os.PathLike, dst: str | os.PathLike, *, keep_system: bool = False,
                  skip_invalid: bool = False) -> ConvertStats:
    """A JSON list of InternVL records -> JSONL, like the official ``tools/json2jsonl.py``.

    Drops a leading ``system`` turn (unless ``keep_system``), sets ``id`` to 0, 1, 2, ... in output
    order (overwriting any existing id) and writes one ``json.dumps(ensure_ascii=False)`` per line.
    The list is streamed, so files larger than memory work.
    """
    return _run(src, dst, "array", _official_clean(keep_system), skip_invalid)


def jsonl_to_jsonl(src: str | os.PathLike, dst: str | os.PathLike, *, keep_system: bool = False,
                   skip_invalid: bool = False) -> ConvertStats:
    """Clean an InternVL JSONL file like the official ``tools/jsonl2jsonl.py`` (see `json_to_jsonl`).

    Blank lines are skipped (the official tool crashes on them).
    """
    return _run(src, dst, "jsonl", _official_clean(keep_system), skip_invalid)


# --------------------------------------------------------------------------------------------
# ShareGPT / OpenAI -> InternVL

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
            raise _Reject("unsupported_field", f"field {key!r} is not supported by InternVL SFT records; "
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
        raise _Reject("no_conversations", "no messages")
    body = turns[1:] if turns[0]["from"] == "system" else turns
    for k, t in enumerate(body):
        if t["from"] == "system":
            raise _Reject("bad_role_order", "a system message is allowed only as the first message")
        expected = "human" if k % 2 == 0 else "gpt"
        if t["from"] != expected:
            raise _Reject("bad_role_order", f"message {k} is from {'user' if t['from'] == 'human' else 'assistant'} "
                                            f"but {'user' if expected == 'human' else 'assistant'} was expected "
                                            "(messages must alternate user, assistant, starting with user)")
    if not body:
        raise _Reject("missing_answer", "no user/assistant messages")
    if body[-1]["from"] != "gpt":
        raise _Reject("missing_answer", "the last message is from the user, with no assistant answer")

    def count(tag: str, roles: set[str]) -> int:
        return sum(t["value"].count(tag) for t in turns if t["from"] in roles)

    for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if count(tag, {"gpt", "system"}):
            raise _Reject("bad_placeholder", f"{tag} appears in an assistant or system message; "
                                             "InternVL expects media placeholders in user messages")
    first_human = body[0]
    n_img = count(IMAGE_PLACEHOLDER, {"human"})
    n_vid = count(VIDEO_PLACEHOLDER, {"human"})
    if images and videos:
        raise _Reject("image_and_video", "InternVL records hold either images or one video, not both")
    if len(videos) > 1:
        raise _Reject("too_many_videos", f"{len(videos)} videos; InternVL records hold one video")
    if images:
        if n_vid:
            raise _Reject("bad_placeholder", f"{VIDEO_PLACEHOLDER} tag without a video")
        if n_img == 0:
            first_human["value"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + first_human["value"]
        elif n_img != len(images):
            raise _Reject("image_count", f"{n_img} {IMAGE_PLACEHOLDER} tag(s) for {len(images)} image(s)")
    elif videos:
        if n_img:
            raise _Reject("bad_placeholder", f"{IMAGE_PLACEHOLDER} tag(s) in a video record")
        if n_vid == 0:
            first_human["value"] = VIDEO_PLACEHOLDER + "\n" + first_human["value"]
        elif n_vid > 1 or VIDEO_PLACEHOLDER not in first_human["value"]:
            raise _Reject("bad_placeholder", f"a video record needs exactly one {VIDEO_PLACEHOLDER}, in the first user message")
    elif n_img or n_vid:
        tag = IMAGE_PLACEHOLDER if n_img else VIDEO_PLACEHOLDER
        raise _Reject("bad_placeholder", f"{n_img or n_vid} {tag} tag(s) but the record has no {'images' if n_img else 'video'}")

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


def _media_list(obj: dict, key: str, media: _MediaWriter, what: str) -> list[str]:
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
                raise _Reject("bad_media", f"embedded {what} bytes are not supported; save them as files or use a data: URL")
            else:
                raise _Reject("bad_media", f"{key!r} entries must be paths (or objects with a 'path'), got {item!r}")
        out.append(media.local_path(item, what))
    return out


def _sharegpt_transform(media: _MediaWriter, keep_system: bool) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise _Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        _check_unsupported(obj)
        present = [k for k in ("messages", "conversations", "conversation") if obj.get(k) is not None]
        if not present:
            raise _Reject("no_conversations", "no 'messages', 'conversations' or 'conversation' list")
        if len(present) > 1:
            raise _Reject("bad_record", f"record has both {present[0]!r} and {present[1]!r}; keep one")
        key = present[0]
        msgs = obj[key]
        if not isinstance(msgs, list) or not msgs:
            raise _Reject("no_conversations", f"{key!r} must be a non-empty list")
        turns: list[dict] = []
        if key == "conversation":  # ms-swift pairs: [{"human": q, "assistant": a}, ...]
            for k, pair in enumerate(msgs):
                if not isinstance(pair, dict):
                    raise _Reject("bad_turn", f"conversation entry {k} must be an object")
                q = next((pair[r] for r in ("human", "user", "query") if r in pair), None)
                a = next((pair[r] for r in ("assistant", "gpt", "response") if r in pair), None)
                if not isinstance(q, str) or not isinstance(a, str):
                    raise _Reject("bad_turn", f"conversation entry {k} needs string 'human' and 'assistant' fields")
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        else:
            for k, m in enumerate(msgs):
                if not isinstance(m, dict):
                    raise _Reject("bad_turn", f"message {k} must be an object")
                role = m.get("role", m.get("from"))
                content = m["content"] if "content" in m else m.get("value")
                if not isinstance(role, str):
                    raise _Reject("bad_turn", f"message {k} has no 'role' (or 'from')")
                r = role.lower()
                if r in _TOOL_ROLES:
                    raise _Reject("unsupported_role", f"message {k}: role {role!r} (tool use) is not supported by InternVL templates")
                if r not in _HUMAN | _GPT | _SYSTEM:
                    raise _Reject("bad_role", f"message {k}: unknown role {role!r}; use user/human, assistant/gpt or system")
                if isinstance(content, list):
                    raise _Reject("bad_turn", f"message {k}: content is a list of parts; convert this file with --from openai")
                if not isinstance(content, str):
                    raise _Reject("bad_turn", f"message {k} has no string 'content' (or 'value')")
                turns.append({"from": "human" if r in _HUMAN else "gpt" if r in _GPT else "system", "value": content})
        turns = _with_system(obj, turns, keep_system)
        # LLaVA-style records name the media "image" / "video" (the InternVL spelling): accept both.
        for plural, singular in (("images", "image"), ("videos", "video")):
            if obj.get(plural) not in (None, "", []) and obj.get(singular) not in (None, "", []):
                raise _Reject("bad_record", f"record has both {plural!r} and {singular!r}; keep one")
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
        raise _Reject("unsupported_part", f"message {k}, part {j}: content type {ptype!r} is not supported "
                                          "(use text, image_url, image, video_url or video)")
    if not isinstance(val, str) or not val:
        raise _Reject("bad_media", f"message {k}, part {j}: {ptype} part has no URL or path")
    return kind, val


def _openai_transform(media: _MediaWriter, keep_system: bool) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise _Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        _check_unsupported(obj)
        if obj.get("images") or obj.get("videos"):
            raise _Reject("bad_record", "top-level 'images'/'videos' belong to the ShareGPT layout; use --from sharegpt")
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _Reject("no_conversations", "missing or empty 'messages' list")
        turns: list[dict] = []
        images: list[str] = []
        videos: list[str] = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise _Reject("bad_turn", f"message {k} must be an object")
            role = m.get("role")
            if not isinstance(role, str):
                raise _Reject("bad_turn", f"message {k} has no 'role'")
            r = role.lower()
            if r in _TOOL_ROLES or m.get("tool_calls") or m.get("function_call"):
                raise _Reject("unsupported_role", f"message {k}: tool calls and tool results are not supported by InternVL templates")
            if r == "developer":
                r = "system"
            if r not in ("user", "assistant", "system"):
                raise _Reject("bad_role", f"message {k}: unknown role {role!r}; use user, assistant or system")
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
                        raise _Reject("bad_turn", f"message {k}, part {j} must be an object")
                    if part.get("type") in ("text", "input_text", "output_text"):
                        if not isinstance(part.get("text"), str):
                            raise _Reject("bad_turn", f"message {k}, part {j}: text part without a string 'text'")
                        pieces.append(part["text"])
                        texts.append(part["text"])
                        continue
                    kind, ref = _part_media(part, k, j)
                    if who != "human":
                        raise _Reject("bad_placeholder", f"message {k}: {kind} parts are allowed only in user messages")
                    if kind == "image":
                        images.append(media.local_path(ref, "image"))
                        pieces.append(IMAGE_PLACEHOLDER)
                    else:
                        videos.append(media.local_path(ref, "video"))
                        pieces.append(VIDEO_PLACEHOLDER)
            else:
                raise _Reject("bad_turn", f"message {k}: 'content' must be a string or a list of parts")
            for t in texts:
                for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                    if tag in t:
                        raise _Reject("bad_placeholder", f"message {k}: text contains a literal {tag}; in this layout "
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
    media = _MediaWriter(Path(dst), None, media_root, source_root)
    return _run(src, dst, "auto", _sharegpt_transform(media, keep_system), skip_invalid, media)


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
    media = _MediaWriter(Path(dst), images_dir, media_root, source_root)
    return _run(src, dst, "auto", _openai_transform(media, keep_system), skip_invalid, media)


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, keep_system: bool | None = None,
            skip_invalid: bool = False, **options: Any) -> ConvertStats:
    """Dispatch on ``fmt`` in ``FORMATS``. ``keep_system=None`` uses each format's default
    (``json``/``jsonl``: drop, as the official tools do; ``sharegpt``/``openai``: keep).
    Extra options (``media_root``, ``source_root``, ``images_dir``) go to the converters that take them.
    """
    if fmt not in FORMATS:
        raise DataError("bad_args", f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    kwargs: dict[str, Any] = {"skip_invalid": skip_invalid}
    if keep_system is not None:
        kwargs["keep_system"] = keep_system
    allowed = {"json": set(), "jsonl": set(), "sharegpt": {"media_root", "source_root"},
               "openai": {"media_root", "source_root", "images_dir"}}[fmt]
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - allowed
    if unknown:
        raise DataError("bad_args", f"option(s) {sorted(unknown)} do not apply to --from {fmt}")
    kwargs.update(given)
    fn = {"json": json_to_jsonl, "jsonl": jsonl_to_jsonl, "sharegpt": sharegpt_to_internvl,
          "openai": openai_to_internvl}[fmt]
    return fn(src, dst, **kwargs)
