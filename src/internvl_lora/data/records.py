"""Reading the official InternVL data format: a meta JSON file naming JSONL annotation files.

Meta file (one entry per dataset, official fields):

    {"my_set": {"root": "images/", "annotation": "train.jsonl", "data_augment": false,
                "repeat_time": 1, "max_dynamic_patch": 6}}

A bare `.jsonl` path is accepted too (root = its folder, no augmentation, repeat 1).

Each JSONL line is one record: `{"id": ..., "conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4", "clip": [start, end]}`.
`parse_record` validates one line and returns a `Record`, or raises a `DataError` naming file:line.
Sample indices follow the meta file's dataset order, then line order, before any repeat or shuffle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..internvl.constants import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, VIDEO_PLACEHOLDER

META_FIELDS = {"root", "annotation", "data_augment", "repeat_time", "max_dynamic_patch", "length"}
REQUIRED_META_FIELDS = ("root", "annotation")


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


@dataclass
class Line:
    """One raw annotation line and where it came from."""

    index: int  # global sample index: meta order, then line order
    spec: DatasetSpec
    path: str
    line: int  # 1-based
    text: str


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


def _meta_error(meta_path: str, name: str | None, message: str) -> DataError:
    where = f"dataset {name!r}: " if name else ""
    return DataError("bad_meta", where + message, path=meta_path)


def load_meta(path: str | Path) -> list[DatasetSpec]:
    """Parse a meta JSON file (or accept a bare JSONL path); validates every field, reports all problems."""
    path = Path(path)
    if not path.exists():
        raise DataError("bad_meta", "file not found; give a meta .json file or a .jsonl annotation file", path=str(path))
    if path.suffix == ".jsonl":
        return [DatasetSpec(name=path.stem, root=str(path.parent), annotation=str(path), meta_path=None)]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError("bad_meta", f"not UTF-8 text ({e.reason})", path=str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError("bad_meta", f"not valid JSON: {e.msg}", path=str(path), line=e.lineno) from None
    if not isinstance(meta, dict) or not meta:
        raise _meta_error(str(path), None, "the meta file must be a JSON object mapping dataset names to entries")
    specs, problems = [], []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            problems.append(f"dataset {name!r}: entry must be an object")
            continue
        for key in REQUIRED_META_FIELDS:
            if key not in entry:
                problems.append(f"dataset {name!r}: missing field {key!r}")
        unknown = set(entry) - META_FIELDS
        if unknown:
            problems.append(f"dataset {name!r}: unknown field(s) {sorted(unknown)}; known: {sorted(META_FIELDS)}")
        if "root" not in entry or "annotation" not in entry:
            continue
        base = path.parent
        root = entry["root"]
        annotation = entry["annotation"]
        if not isinstance(root, str) or not isinstance(annotation, str):
            problems.append(f"dataset {name!r}: 'root' and 'annotation' must be strings")
            continue
        ann_path = annotation if os.path.isabs(annotation) else str(base / annotation)
        root_path = root if (os.path.isabs(root) or root.startswith("s3://")) else str(base / root)
        if not ann_path.endswith("jsonl"):
            problems.append(f"dataset {name!r}: annotation {annotation!r} must be a .jsonl file (convert with `internvl-lora data convert`)")
        elif not os.path.exists(ann_path):
            problems.append(f"dataset {name!r}: annotation file {ann_path} does not exist")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not math.isfinite(repeat) or repeat <= 0:
            problems.append(f"dataset {name!r}: repeat_time must be a positive number, got {repeat!r}")
        elif repeat > 1 and float(repeat) != int(repeat):
            problems.append(f"dataset {name!r}: repeat_time {repeat} > 1 must be a whole number (the official loader asserts this)")
        augment = entry.get("data_augment", False)
        if not isinstance(augment, bool):
            problems.append(f"dataset {name!r}: data_augment must be true or false, got {augment!r}")
        mdp = entry.get("max_dynamic_patch")
        if mdp is not None and (isinstance(mdp, bool) or not isinstance(mdp, int) or mdp < 1):
            problems.append(f"dataset {name!r}: max_dynamic_patch must be a positive integer, got {mdp!r}")
        specs.append(DatasetSpec(
            name=name, root=root_path, annotation=ann_path, data_augment=bool(augment),
            repeat_time=float(repeat) if isinstance(repeat, (int, float)) else 1.0,
            max_dynamic_patch=mdp if isinstance(mdp, int) else None, meta_path=str(path),
        ))
    if problems:
        raise DataError("bad_meta", "; ".join(problems), path=str(path))
    return specs


def read_lines(specs: list[DatasetSpec]) -> list[Line]:
    """Every annotation line (blank lines skipped), indexed in meta order then line order."""
    lines: list[Line] = []
    for spec in specs:
        with open(spec.annotation, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    text = raw.decode("utf-8", errors="replace")
                    text = "\x00BAD-UTF8\x00" + f"byte {e.start}"
                lines.append(Line(len(lines), spec, spec.annotation, number, text))
    return lines


def apply_repeat(lines: list[Line]) -> list[Line]:
    """The official `repeat_time` per dataset: < 1 keeps the first fraction, > 1 repeats whole."""
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


def parse_record(ln: Line) -> Record:
    """Validate one line against the official schema and return a Record (raises DataError)."""
    def fail(kind: str, msg: str) -> DataError:
        return DataError(kind, msg, path=ln.path, line=ln.line)

    if ln.text.startswith("\x00BAD-UTF8\x00"):
        raise fail("bad_encoding", f"line is not valid UTF-8 ({ln.text.split(chr(0))[-1]})")
    try:
        obj = json.loads(ln.text)
    except json.JSONDecodeError as e:
        raise fail("bad_json", f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise fail("bad_json", "each line must be a JSON object")
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
        if role not in ("human", "gpt"):
            raise fail("bad_role", f"turn {k}: unknown role {role!r}; use 'human', 'gpt' (and 'system' first)")
        expected = "human" if k % 2 == 0 else "gpt"
        if role != expected:
            raise fail("bad_role_order", f"turn {k} is {role!r} but {expected!r} was expected (turns must alternate human, gpt)")
    if not turns:
        raise fail("missing_answer", "no human/gpt turns")
    if turns[-1][0] != "gpt":
        raise fail("missing_answer", "the last turn is a question with no 'gpt' answer")
    for k, (role, value) in enumerate(turns):
        if role == "gpt" and not value.strip():
            raise fail("empty_answer", f"turn {k}: empty answer")
    for marker in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN):
        if any(marker in v for _, v in turns) or (system and marker in system):
            raise fail("bad_placeholder", f"text contains {marker!r}; write {IMAGE_PLACEHOLDER!r} where an image goes")

    image = obj.get("image")
    video = obj.get("video")
    images: list[str] = []
    if image:
        if image and video:
            raise fail("image_and_video", "a record holds either 'image' or 'video', not both")
        if isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(p, str) and p for p in image):
            images = list(image)
        else:
            raise fail("bad_image_field", "'image' must be a path or a list of paths")
    elif video and not isinstance(video, str):
        raise fail("bad_video_field", "'video' must be a path")

    human_count = sum(v.count(IMAGE_PLACEHOLDER) for r, v in turns if r == "human")
    gpt_count = sum(v.count(IMAGE_PLACEHOLDER) for r, v in turns if r == "gpt")
    if gpt_count:
        raise fail("image_count", f"an answer contains {IMAGE_PLACEHOLDER}; placeholders belong in 'human' turns")
    if images:
        if isinstance(image, str) and human_count == 0:
            # Official: a single-image sample without a placeholder gets "<image>\n" in front of the first turn.
            # Unlike the official code we put it in the first *human* turn, never into a system turn.
            turns[0] = (turns[0][0], IMAGE_PLACEHOLDER + "\n" + turns[0][1])
            human_count = 1
        if human_count != len(images):
            raise fail("image_count", f"{human_count} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    elif video:
        vcount = sum(v.count(VIDEO_PLACEHOLDER) for r, v in turns if r == "human")
        if vcount == 0:
            turns[0] = (turns[0][0], VIDEO_PLACEHOLDER + "\n" + turns[0][1])
        elif vcount > 1 or VIDEO_PLACEHOLDER not in turns[0][1]:
            raise fail("image_count", f"a video sample needs exactly one {VIDEO_PLACEHOLDER} in the first question")
        if human_count:
            raise fail("image_count", f"a video sample cannot also hold {IMAGE_PLACEHOLDER} placeholders")
    elif human_count:
        raise fail("image_count", f"{human_count} {IMAGE_PLACEHOLDER} placeholder(s) but the record has no 'image'")

    clip = obj.get("clip")
    if clip is not None:
        if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(c, (int, float)) for c in clip)):
            raise fail("bad_video_field", "'clip' must be [start_seconds, end_seconds]")
        clip = (float(clip[0]), float(clip[1]))
    return Record(
        id=obj.get("id"), turns=turns, system=system,
        images=[_resolve(ln.spec.root, p) for p in images],
        video=_resolve(ln.spec.root, video) if video else None, clip=clip, source=(ln.path, ln.line),
    )
