"""Shared machinery of the annotation converters: streaming JSON/JSONL input, writing DST and the
rejected file atomically, and the `ConvertStats` a conversion returns.

Each converter (official.py, chat.py) supplies only a ``transform(record, index) -> record`` and calls
`run`; a transform raises `Reject` for a record that cannot be converted.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ...errors import DataError

if TYPE_CHECKING:
    from .media import MediaWriter

_CHUNK = 1 << 20  # bytes read at a time when streaming a JSON list
_LISTED = 20  # file:line places a summary lists before '... (+N)'


@dataclass
class ConvertStats:
    """What a conversion did."""

    written: int = 0
    rejected: int = 0
    dst: str = ""
    source: str = ""  # the input file
    rejected_path: str | None = None  # set only when at least one record was rejected
    images_written: int = 0  # files decoded from data: URLs (openai / sharegpt)
    # "file:line" of every record whose leading system turn was dropped (json / jsonl without --keep-system)
    system_dropped: list[str] = field(default_factory=list)
    system_dropped_note: str = ("as the official tool does (pass --keep-system to keep it; the InternVL format "
                                "accepts it)")
    line: int = 0  # source line of the record being converted (set by `run` for the transforms)

    def summary(self) -> str:
        text = f"wrote {self.written} record(s) to {self.dst}"
        if self.images_written:
            text += f", decoded {self.images_written} image file(s)"
        if self.rejected:
            text += f"; rejected {self.rejected} record(s), listed in {self.rejected_path}"
        if self.system_dropped:
            shown = ", ".join(self.system_dropped[:_LISTED])
            more = f", ... (+{len(self.system_dropped) - _LISTED})" if len(self.system_dropped) > _LISTED else ""
            text += (f"\ndropped the leading system turn of {len(self.system_dropped)} record(s), "
                     f"{self.system_dropped_note}: {shown}{more}")
        return text


class Reject(Exception):
    """A record that cannot be converted (kind, message)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


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


def run(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layout: str,
    transform: Callable[[Any, int], dict],
    skip_invalid: bool,
    media: MediaWriter | None = None,
    stats: ConvertStats | None = None,
) -> ConvertStats:
    """Read records, transform each, write DST (and the rejected file) atomically. A transform that notes
    something per record (the official cleaners) gets `stats` passed here and reads `stats.line`."""
    src_path = _open_check(src)
    dst_path = Path(dst)
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise DataError("bad_args", "the output path is the input file; choose a different DST", path=str(dst_path))
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    rej_path = rejected_path_for(dst_path)
    tmp = dst_path.with_name(f".{dst_path.name}.tmp-{os.getpid()}")
    rej_tmp = rej_path.with_name(f".{rej_path.name}.tmp-{os.getpid()}")
    stats = stats if stats is not None else ConvertStats()
    stats.dst, stats.source = str(dst_path), str(src_path)
    ok = False
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out, open(rej_tmp, "w", encoding="utf-8", newline="\n") as rej:
            for line, value in _iter_records(src_path, layout):
                try:
                    if isinstance(value, _Bad):
                        raise Reject(value.kind, value.message)
                    stats.line = line
                    record = transform(value, stats.written)
                except Reject as r:
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
