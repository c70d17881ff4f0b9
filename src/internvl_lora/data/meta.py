"""The official meta file and its annotation lines: which JSONL files make up a data set.

Meta file (one entry per dataset, the official fields):

    {"my_set": {"root": "images/", "annotation": "train.jsonl", "data_augment": false,
                "repeat_time": 1, "max_dynamic_patch": 6}}

A bare `.jsonl` path is accepted too (root = its folder, no augmentation, repeat 1). Sample indices
follow the meta file's dataset order, then line order, before any repeat or shuffle.

Problems with one dataset entry of a meta file (a bad field, an annotation file that does not exist,
an invalid `repeat_time`) do not stop `load_meta`: the entry is left out and the problem is kept in
`MetaSpecs.problems`, so the data audit reports it with every other problem. Code that reads lines
through `read_lines` gets all of them at once as one `DataError`. A meta file that cannot be read at
all (missing, not UTF-8, not JSON, not an object) raises at once. What one line holds: `records`
(supervised) and `preference` (preference pairs).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

META_FIELDS = {"root", "annotation", "data_augment", "repeat_time", "max_dynamic_patch", "length"}
REQUIRED_META_FIELDS = ("annotation",)  # no root: the annotation file's folder, like a bare .jsonl


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


def resolve_media(root: str, rel: str) -> str:
    if root.startswith("s3://"):
        return root + rel
    return os.path.join(root, rel)
