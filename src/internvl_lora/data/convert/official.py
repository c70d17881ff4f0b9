"""The official InternVL cleaners: ``tools/json2jsonl.py`` and ``tools/jsonl2jsonl.py``, same results."""

from __future__ import annotations

import os
from typing import Any, Callable

from .stream import ConvertStats, Reject, run

def _official_clean(keep_system: bool, stats: ConvertStats) -> Callable[[Any, int], dict]:
    def transform(obj: Any, index: int) -> dict:
        if not isinstance(obj, dict):
            raise Reject("bad_record", f"each record must be a JSON object, got {type(obj).__name__}")
        conv = obj.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise Reject("no_conversations", "missing or empty 'conversations' list")
        if not all(isinstance(t, dict) for t in conv):
            raise Reject("bad_turn", "every entry of 'conversations' must be an object with 'from' and 'value'")
        obj = dict(obj)
        if conv[0].get("from") == "system" and not keep_system:
            obj["conversations"] = conv[1:]
            if not obj["conversations"]:
                raise Reject("no_conversations", "the record holds only a system turn")
            stats.system_dropped.append(f"{stats.source}:{stats.line}")  # said in the summary, not silent
        obj["id"] = index
        return obj

    return transform


def json_to_jsonl(src: str | os.PathLike, dst: str | os.PathLike, *, keep_system: bool = False,
                  skip_invalid: bool = False) -> ConvertStats:
    """A JSON list of InternVL records -> JSONL, like the official ``tools/json2jsonl.py``.

    Drops a leading ``system`` turn (unless ``keep_system``; each drop is listed in the stats' summary), sets ``id`` to 0, 1, 2, ... in output
    order (overwriting any existing id) and writes one ``json.dumps(ensure_ascii=False)`` per line.
    The list is streamed, so files larger than memory work.
    """
    stats = ConvertStats(source=str(src))
    return run(src, dst, "array", _official_clean(keep_system, stats), skip_invalid, stats=stats)


def jsonl_to_jsonl(src: str | os.PathLike, dst: str | os.PathLike, *, keep_system: bool = False,
                   skip_invalid: bool = False) -> ConvertStats:
    """Clean an InternVL JSONL file like the official ``tools/jsonl2jsonl.py`` (see `json_to_jsonl`).

    Blank lines are skipped (the official tool crashes on them).
    """
    stats = ConvertStats(source=str(src))
    return run(src, dst, "jsonl", _official_clean(keep_system, stats), skip_invalid, stats=stats)
