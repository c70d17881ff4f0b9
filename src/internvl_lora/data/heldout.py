"""Held-out samples for generation: the last question of a record, its earlier turns as history, its
images and the last answer as reference (a preference pair: its question, the chosen answer as reference
and the rejected one kept beside it). Read by `validate` and by the generation metric during training."""

from __future__ import annotations

from typing import Iterable

from ..errors import DataError
from .audit import Problem
from .meta import Line
from .preference import is_preference_object, parse_preference
from .records import Record, load_object, parse_record


def parse_any(ln: Line) -> tuple[Record, str | None]:
    """(record, rejected answer) of a preference line, (record, None) of a supervised one."""
    if is_preference_object(load_object(ln)):
        pair = parse_preference(ln)
        return pair.chosen, pair.rejected_answer
    return parse_record(ln), None


def heldout_samples(lines: Iterable[Line], limit: int | None = None) -> tuple[list[dict], list[Problem]]:
    """(question, history, images, reference, system) of the first `limit` valid lines (all when `limit` is
    None or 0), in order; a line repeated by `repeat_time` (same index) counts once. Problems are returned,
    not hidden: invalid records, and video samples (not generated on yet)."""
    samples, problems, seen = [], [], set()
    for ln in lines:
        if ln.index in seen:
            continue
        seen.add(ln.index)
        try:
            rec, rejected = parse_any(ln)
        except DataError as e:
            problems.append(Problem(e.kind, e.path, e.line, e.detail))
            continue
        if rec.video:
            problems.append(Problem("unsupported", ln.path, ln.line, "video samples are not validated yet"))
            continue
        turns = rec.turns
        history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 2, 2)]
        samples.append({"index": ln.index, "source": f"{ln.path}:{ln.line}", "question": turns[-2][1],
                        "history": history, "images": rec.images, "reference": turns[-1][1], "system": rec.system})
        if rejected is not None:
            samples[-1]["rejected"] = rejected
        if limit and len(samples) >= limit:
            break
    return samples, problems
