"""One supervised record of the official InternVL JSONL format, validated.

Each JSONL line is one record: `{"id": ..., "conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4", "clip": [start, end]}`.
`parse_record` validates one line and returns a `Record`, or raises a `DataError` naming file:line.
The meta file and the lines themselves: `meta`; preference pairs (question / chosen / rejected): `preference`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..errors import DataError
from ..internvl.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, VIDEO_PLACEHOLDER
from .convert.detect import unconverted_layout
from .meta import Line, resolve_media

ROLES = ("human", "gpt")


@dataclass
class Record:
    """A validated sample."""

    id: object
    turns: list[tuple[str, str]]  # alternating ("human", text), ("gpt", text)
    system: str | None
    images: list[str] = field(default_factory=list)  # resolved paths
    video: str | None = None
    clip: tuple[float, float] | None = None
    source: tuple[str, int] = ("", 0)  # (file, 1-based line)
    multi_image: bool = False  # "image" was a list (official multi-image path, even with one element)

    @property
    def kind(self) -> str:
        if self.video:
            return "video"
        if self.images:
            return "multi_image" if self.multi_image else "image"
        return "text"


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def load_object(ln: Line) -> dict:
    """The JSON object of one annotation line (raises DataError naming file:line)."""
    if ln.text is None:
        raise DataError("bad_encoding", f"line is not UTF-8 text ({ln.error or 'undecodable bytes'})", ln.path, ln.line)
    try:
        obj = json.loads(ln.text)
    except json.JSONDecodeError as e:
        raise DataError("bad_json", f"not valid JSON: {e.msg} (column {e.colno})", ln.path, ln.line) from None
    except (ValueError, RecursionError) as e:  # too deeply nested, integer too long
        raise DataError("bad_json", f"not valid JSON: {str(e)[:200]}", ln.path, ln.line) from None
    if not isinstance(obj, dict):
        raise DataError("bad_json", f"each line must be a JSON object, got {type(obj).__name__}", ln.path, ln.line)
    return obj


def parse_record(ln: Line) -> Record:
    """Validate one line against the official schema and return a Record (raises DataError)."""
    obj = load_object(ln)
    foreign = unconverted_layout(obj, ln.path)
    if foreign:
        raise DataError("unconverted_layout", foreign, ln.path, ln.line)
    if "conversations" not in obj and {"question", "chosen", "rejected"} <= set(obj):
        raise DataError("no_conversations", "this is a preference record (question / chosen / rejected), not a "
                        "supervised one: train it with train.objective=mpo (check it with `data check "
                        "--objective mpo`)", ln.path, ln.line)
    return record_from_object(obj, ln)


def record_from_object(obj: dict, ln: Line) -> Record:
    """Validate a record's JSON object (conversations, media fields) as the official loader reads it."""
    def fail(kind: str, msg: str) -> DataError:
        return DataError(kind, msg, path=ln.path, line=ln.line)

    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise fail("no_conversations", "missing or empty 'conversations' list")
    turns: list[tuple[str, str]] = []
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise fail("bad_turn", f"turn {k} must be an object with string fields 'from' and 'value'")
        turns.append((t["from"], t["value"]))
    system = None
    if turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    for k, (role, _) in enumerate(turns):
        if role == "system":
            raise fail("bad_role_order", f"turn {k + (system is not None)}: a 'system' turn is allowed only as the first turn")
        if role not in ROLES:
            raise fail("bad_role", f"turn {k + (system is not None)}: unknown role {role!r}; use 'human', 'gpt' "
                       "(and 'system' as the first turn)")
        expected = ROLES[k % 2]
        if role != expected:
            raise fail("bad_role_order", f"turn {k + (system is not None)} is {role!r} but {expected!r} was expected "
                       "(turns must alternate human, gpt, starting with human)")
    if not turns:
        raise fail("missing_answer", "no human/gpt turns")
    if turns[-1][0] != "gpt":
        raise fail("missing_answer", "the last turn is a question with no 'gpt' answer")
    for k, (role, value) in enumerate(turns):
        if role == "gpt" and not value.strip():
            raise fail("empty_answer", f"turn {k + (system is not None)}: empty answer")
    texts = [v for _, v in turns] + ([system] if system is not None else [])
    for v in texts:
        if not _utf8_ok(v):
            raise fail("bad_encoding", "a turn holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape that is "
                       "not half of a pair); it cannot be tokenized")
    for marker in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN):
        if any(marker in v for v in texts):
            raise fail("bad_placeholder", f"text contains {marker!r}; write {IMAGE_PLACEHOLDER!r} where an image goes")
    for marker in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if any(marker in v for r, v in turns if r == "gpt"):
            raise fail("bad_placeholder", f"an answer contains {marker}; placeholders belong in 'human' turns")
        if system is not None and marker in system:
            raise fail("bad_placeholder", f"the system turn contains {marker}; placeholders belong in 'human' turns")

    image = obj.get("image")
    video = obj.get("video")
    images: list[str] = []
    if image:
        if video:
            raise fail("image_and_video", "a record holds either 'image' or 'video', not both")
        if isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(p, str) and p for p in image):
            images = list(image)
        else:
            raise fail("bad_image_field", "'image' must be a path or a list of paths")
    elif video and not isinstance(video, str):
        raise fail("bad_video_field", "'video' must be a path")

    if not all(_utf8_ok(p) for p in images + ([video] if isinstance(video, str) else [])):
        raise fail("bad_encoding", "a media path holds a lone UTF-16 surrogate escape")

    human_count = sum(v.count(IMAGE_PLACEHOLDER) for r, v in turns if r == "human")
    video_count = sum(v.count(VIDEO_PLACEHOLDER) for r, v in turns if r == "human")
    if images:
        if video_count:
            raise fail("image_count", f"{VIDEO_PLACEHOLDER} in a record that has images but no 'video'")
        if isinstance(image, str) and human_count == 0:
            # Official: a single-image sample without a placeholder gets "<image>\n" in front of the first turn.
            # Unlike the official code we put it in the first *human* turn, never into a system turn.
            turns[0] = (turns[0][0], IMAGE_PLACEHOLDER + "\n" + turns[0][1])
            human_count = 1
        if human_count != len(images):
            raise fail("image_count", f"{human_count} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)"
                       + ("" if isinstance(image, str) else " (a list of images needs one placeholder per image)"))
    elif video:
        if human_count:
            raise fail("image_count", f"a video sample cannot also hold {IMAGE_PLACEHOLDER} placeholders")
        if video_count == 0:
            turns[0] = (turns[0][0], VIDEO_PLACEHOLDER + "\n" + turns[0][1])
        elif video_count > 1 or VIDEO_PLACEHOLDER not in turns[0][1]:
            raise fail("image_count", f"a video sample needs exactly one {VIDEO_PLACEHOLDER}, in the first question")
    elif human_count or video_count:
        what = IMAGE_PLACEHOLDER if human_count else VIDEO_PLACEHOLDER
        raise fail("image_count", f"{human_count or video_count} {what} placeholder(s) but the record has no "
                   f"{'image' if human_count else 'video'}")

    clip = obj.get("clip")
    if clip is not None:
        if not video:
            raise fail("bad_video_field", "'clip' is given but the record has no 'video'")
        if not (isinstance(clip, list) and len(clip) == 2
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in clip)):
            raise fail("bad_video_field", "'clip' must be [start_seconds, end_seconds]")
        if not 0 <= clip[0] < clip[1]:
            raise fail("bad_video_field", f"'clip' {clip} must satisfy 0 <= start < end")
        clip = (float(clip[0]), float(clip[1]))
    return Record(
        id=obj.get("id"), turns=turns, system=system,
        images=[resolve_media(ln.spec.root, p) for p in images],
        video=resolve_media(ln.spec.root, video) if video else None, clip=clip, source=(ln.path, ln.line),
        multi_image=isinstance(image, list) and bool(images),
    )
