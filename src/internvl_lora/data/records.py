"""Reading the official InternVL data format: a meta JSON file naming JSONL annotation files.

Meta file (one entry per dataset, the official fields):

    {"my_set": {"root": "images/", "annotation": "train.jsonl", "data_augment": false,
                "repeat_time": 1, "max_dynamic_patch": 6}}

A bare `.jsonl` path is accepted too (root = its folder, no augmentation, repeat 1).

Each JSONL line is one record: `{"id": ..., "conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4", "clip": [start, end]}`.
`parse_record` validates one line and returns a `Record`, or raises a `DataError` naming file:line.
Sample indices follow the meta file's dataset order, then line order, before any repeat or shuffle.

Problems with one dataset entry of a meta file (a bad field, an annotation file that does not exist,
an invalid `repeat_time`) do not stop `load_meta`: the entry is left out and the problem is kept in
`MetaSpecs.problems`, so the data audit reports it with every other problem. Code that reads lines
through `read_lines` gets all of them at once as one `DataError`. A meta file that cannot be read at
all (missing, not UTF-8, not JSON, not an object) raises at once.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..internvl.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, VIDEO_PLACEHOLDER
from .convert.detect import unconverted_layout

META_FIELDS = {"root", "annotation", "data_augment", "repeat_time", "max_dynamic_patch", "length"}
REQUIRED_META_FIELDS = ("annotation",)  # no root: the annotation file's folder, like a bare .jsonl
ROLES = ("human", "gpt")


@dataclass
class DatasetSpec:
    """One entry of the meta file."""

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    meta_path: str | None = None
    meta_line: int | None = None  # 1-based line of the entry in the meta file


class MetaSpecs(list):
    """The usable datasets of a meta file (a list of `DatasetSpec`), plus the problems of the entries
    that were left out (`DataError`s naming the meta file and the entry's line)."""

    def __init__(self, specs=(), problems=(), path: str | None = None):
        super().__init__(specs)
        self.problems: list[DataError] = list(problems)
        self.path = path


@dataclass
class Line:
    """One raw annotation line and where it came from."""

    index: int  # global sample index: meta order, then line order
    spec: DatasetSpec
    path: str
    line: int  # 1-based
    text: str | None  # None when the bytes are not UTF-8 (then `error` says where)
    error: str | None = None


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


# --------------------------------------------------------------------------------------------------
# meta file


def _entry_lines(text: str) -> dict[str, int]:
    """1-based line of every top-level key of a JSON object text ({} when it cannot be scanned)."""
    dec = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    out: dict[str, int] = {}
    try:
        i = ws.match(text, 0).end()
        if text[i] != "{":
            return {}
        i = ws.match(text, i + 1).end()
        while text[i] != "}":
            key, j = json.decoder.scanstring(text, i + 1)
            out.setdefault(key, text.count("\n", 0, i) + 1)
            j = ws.match(text, j).end()
            if text[j] != ":":
                return out
            _, i = dec.raw_decode(text, ws.match(text, j + 1).end())
            i = ws.match(text, i).end()
            if text[i] == ",":
                i = ws.match(text, i + 1).end()
    except (ValueError, IndexError):
        pass
    return out


def _find_path(value: str, base: Path) -> str:
    """A meta path: absolute as given; relative to the meta file's folder, or (official behaviour, the
    official loader opens paths relative to the working folder) to the working folder when only it has it."""
    if value.startswith("s3://") or os.path.isabs(value):
        return value
    beside = base / value
    if not beside.exists() and Path(value).exists():
        return str(Path(value).resolve())
    return str(beside)


def load_meta(path: str | Path) -> MetaSpecs:
    """Parse a meta JSON file (or accept a bare JSONL path); validates every field of every entry.

    Raises `DataError` when the file itself is unusable; entries with problems are left out and listed
    in the result's `problems`.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("missing_meta", "file not found; give a meta .json file or a .jsonl annotation file",
                        path=str(path))
    if path.is_dir():
        raise DataError("bad_meta", "is a folder; give a meta .json file or a .jsonl annotation file", path=str(path))
    if path.suffix == ".jsonl":
        return MetaSpecs([DatasetSpec(name=path.stem, root=str(path.parent), annotation=str(path))], path=str(path))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError("bad_meta", f"not UTF-8 text (byte {e.start}: {e.reason})", path=str(path)) from None
    except OSError as e:
        raise DataError("bad_meta", f"cannot be read ({e.strerror or e})", path=str(path)) from None

    duplicates: list[str] = []

    def pairs_hook(pairs):
        seen, obj = set(), {}
        for k, v in pairs:
            if k in seen:
                duplicates.append(k)
            seen.add(k)
            obj[k] = v
        return obj

    try:
        meta = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as e:
        raise DataError("bad_meta", f"not valid JSON: {e.msg} (column {e.colno})", path=str(path), line=e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise DataError("bad_meta", f"not valid JSON: {e}", path=str(path)) from None
    if isinstance(meta, list):
        raise DataError("bad_meta", "this is a JSON list, not a meta file (a JSON object mapping dataset names to "
                        "entries); a list of records converts to JSONL with `internvl-lora data convert FILE.json "
                        "OUT.jsonl --from json`", path=str(path))
    if not isinstance(meta, dict) or not meta:
        raise DataError("bad_meta", "the meta file must be a JSON object mapping dataset names to entries, e.g. "
                        '{"my_set": {"root": "images/", "annotation": "train.jsonl", "data_augment": false, '
                        '"repeat_time": 1}}', path=str(path))
    lines = _entry_lines(text)
    base = path.parent
    specs, problems = [], []
    for name, entry in meta.items():
        line = lines.get(name)

        def problem(kind: str, message: str) -> None:
            problems.append(DataError(kind, f"dataset {name!r}: {message}", path=str(path), line=line))

        before = len(problems)
        if name in duplicates:
            problem("bad_meta", "the name appears more than once (JSON keeps only the last entry)")
        if not isinstance(entry, dict):
            problem("bad_meta", f"entry must be an object with 'root' and 'annotation', got {type(entry).__name__}")
            continue
        for key in REQUIRED_META_FIELDS:
            if key not in entry:
                problem("bad_meta", f"missing field {key!r}")
        unknown = set(entry) - META_FIELDS
        if unknown:
            problem("bad_meta", f"unknown field(s) {sorted(unknown)}; known: {sorted(META_FIELDS)}")
        root, annotation = entry.get("root"), entry.get("annotation")
        for key, value in (("root", root), ("annotation", annotation)):
            if key in entry and not (isinstance(value, str) and (value or key == "root")):
                problem("bad_meta", f"{key!r} must be a{' non-empty' if key == 'annotation' else ''} string, got {value!r}")
        augment = entry.get("data_augment", False)
        if not isinstance(augment, bool):
            problem("bad_meta", f"data_augment must be true or false, got {augment!r}")
        mdp = entry.get("max_dynamic_patch")
        if mdp is not None and (isinstance(mdp, bool) or not isinstance(mdp, int) or mdp < 1):
            problem("bad_meta", f"max_dynamic_patch must be a positive integer, got {mdp!r}")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not math.isfinite(repeat) or repeat <= 0:
            problem("bad_repeat_time", f"repeat_time must be a positive number, got {repeat!r}")
        elif repeat > 1 and float(repeat) != int(repeat):
            problem("bad_repeat_time", f"repeat_time {repeat} is above 1 and not a whole number; the official loader "
                    f"accepts only whole repeats above 1 (use {int(repeat)} or {int(repeat) + 1}, or a value below 1 "
                    "to keep the first fraction of the lines)")
        ann_path = None
        if isinstance(annotation, str) and annotation:
            ann_path = _find_path(annotation, base)
            if not ann_path.endswith("jsonl"):
                problem("bad_meta", f"annotation {annotation!r} must be a .jsonl file (convert it with "
                        "`internvl-lora data convert`)")
            elif not os.path.isfile(ann_path):
                problem("missing_annotation", f"annotation file {ann_path} does not exist")
        if len(problems) > before:
            continue
        specs.append(DatasetSpec(
            name=name, annotation=ann_path,
            root=_find_path(root, base) if root else str(base) if "root" in entry else str(Path(ann_path).parent),
            data_augment=augment, repeat_time=float(repeat), max_dynamic_patch=mdp,
            meta_path=str(path), meta_line=line,
        ))
    return MetaSpecs(specs, problems, path=str(path))


def meta_problems(specs) -> list[DataError]:
    return list(getattr(specs, "problems", []) or [])


def raise_meta_problems(specs) -> None:
    """One `DataError` holding every problem of the meta file, if it has any."""
    problems = meta_problems(specs)
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    text = "; ".join(f"line {p.line}: [{p.kind}] {p.detail}" if p.line else f"[{p.kind}] {p.detail}" for p in problems)
    raise DataError(problems[0].kind, f"{len(problems)} problems: {text}", path=problems[0].path)


# --------------------------------------------------------------------------------------------------
# lines


def decode_line(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for UTF-8 bytes, (None, reason) otherwise."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"byte {e.start} (0x{raw[e.start]:02x}) is not valid UTF-8: save the file as UTF-8"


def iter_lines(specs) -> list[Line]:
    """Every annotation line of the usable datasets (blank lines skipped), meta order then line order."""
    lines: list[Line] = []
    for spec in specs:
        try:
            f = open(spec.annotation, "rb")
        except OSError as e:
            raise DataError("missing_annotation", f"cannot open annotation file ({e.strerror or e})",
                            path=spec.annotation) from None
        with f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark
                if not raw.strip():
                    continue
                text, error = decode_line(raw.rstrip(b"\r\n"))
                lines.append(Line(len(lines), spec, spec.annotation, number, text, error))
    return lines


def read_lines(specs) -> list[Line]:
    """Like `iter_lines`, but a meta file with problems is an error (all of them in one message)."""
    raise_meta_problems(specs)
    return iter_lines(specs)


def apply_repeat(lines: list[Line]) -> list[Line]:
    """The official `repeat_time` per dataset: < 1 keeps the first int(n * r) lines, > 1 repeats whole."""
    out: list[Line] = []
    by_spec: dict[int, list[Line]] = {}
    order: list[DatasetSpec] = []
    for ln in lines:
        if id(ln.spec) not in by_spec:
            by_spec[id(ln.spec)] = []
            order.append(ln.spec)
        by_spec[id(ln.spec)].append(ln)
    for spec in order:
        group = by_spec[id(spec)]
        if spec.repeat_time < 1:
            out.extend(group[: int(len(group) * spec.repeat_time)])
        else:
            out.extend(group * int(spec.repeat_time))
    return out


def _resolve(root: str, rel: str) -> str:
    if root.startswith("s3://"):
        return root + rel
    return os.path.join(root, rel)


# --------------------------------------------------------------------------------------------------
# records


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_record(ln: Line) -> Record:
    """Validate one line against the official schema and return a Record (raises DataError)."""
    def fail(kind: str, msg: str) -> DataError:
        return DataError(kind, msg, path=ln.path, line=ln.line)

    if ln.text is None:
        raise fail("bad_encoding", f"line is not UTF-8 text ({ln.error or 'undecodable bytes'})")
    try:
        obj = json.loads(ln.text)
    except json.JSONDecodeError as e:
        raise fail("bad_json", f"not valid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # too deeply nested, integer too long
        raise fail("bad_json", f"not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise fail("bad_json", f"each line must be a JSON object, got {type(obj).__name__}")
    foreign = unconverted_layout(obj, ln.path)
    if foreign:
        raise fail("unconverted_layout", foreign)
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
        images=[_resolve(ln.spec.root, p) for p in images],
        video=_resolve(ln.spec.root, video) if video else None, clip=clip, source=(ln.path, ln.line),
        multi_image=isinstance(image, list) and bool(images),
    )
