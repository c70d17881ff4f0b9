"""Held-out samples for generation: the last question of a record, its earlier turns as history, its
images and the last answer as reference. Read by `validate` and by the generation metric during training."""

from __future__ import annotations

from typing import Iterable

from ..errors import DataError
from .audit import Problem
from .meta import Line
from .records import parse_record


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
            rec = parse_record(ln)
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
        if limit and len(samples) >= limit:
            break
    return samples, problems
