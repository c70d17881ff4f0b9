"""Answer-quality metrics for validation: exact match, ANLS and ROUGE-L.

Pure Python (no numpy, no third-party packages), so it can score anywhere.

Every metric first passes both strings through :func:`normalize_answer`, which

1. lowercases (``str.lower``),
2. collapses every run of whitespace (spaces, tabs, newlines, any Unicode space) to one space
   and strips it from both ends,
3. strips trailing punctuation (any character whose Unicode category starts with ``P``:
   ``. , ! ? ; : ' " ) ] }`` and friends, also CJK ``。``), repeating with step 2 until the
   answer ends in something else, so ``"Paris ."`` and ``"paris!!"`` both become ``"paris"``.

Leading and inner punctuation are kept (``"(a) 3.5"`` stays ``"(a) 3.5"``). A reference may be one
string or a list of acceptable answers; each metric then takes the best (max) over the list.
An empty list of references is a caller bug and raises ``ValueError``. A ``None`` prediction
(the model produced nothing) is scored as the empty string.

Conventions for empty strings (after normalization): two empty strings are identical, so every
metric gives 1.0; an empty string against a non-empty one gives 0.0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "METRICS",
    "normalize_answer",
    "levenshtein",
    "lcs_length",
    "exact_match",
    "anls",
    "rouge_l",
    "score",
    "aggregate",
]

#: Metric names, in the order reports show them.
METRICS: tuple[str, ...] = ("exact_match", "anls", "rouge_l")

#: ROUGE-L's F-measure weight: 1.0 gives the plain harmonic mean (F1) of LCS precision and recall,
#: as Google's ``rouge-score`` package reports (the COCO-caption variant uses 1.2).
ROUGE_L_BETA = 1.0

_WS = re.compile(r"\s+")

Ref = str | Sequence[str]


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def normalize_answer(s: str | None) -> str:
    """Lowercase, collapse whitespace, strip both ends and strip trailing punctuation.

    See the module docstring for the exact rules. ``None`` gives ``""``.
    """
    if s is None:
        return ""
    s = _WS.sub(" ", str(s).lower()).strip()
    end = len(s)
    while end and (_is_punct(s[end - 1]) or s[end - 1] == " "):
        end -= 1
    return s[:end]


def _refs(ref: Ref) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    refs = list(ref)
    if not refs:
        raise ValueError("no reference answers given (empty list)")
    return [r if isinstance(r, str) else ("" if r is None else str(r)) for r in refs]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences.

    Two-row dynamic programme, O(len(a) * len(b)) time and O(min(len)) memory, after trimming the
    common prefix and suffix.
    """
    # Trim the common prefix and suffix: they never cost anything.
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (two-row DP)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def exact_match(pred: str | None, ref: Ref) -> float:
    """1.0 if the normalized prediction equals a normalized reference, else 0.0."""
    p = normalize_answer(pred)
    return 1.0 if any(p == normalize_answer(r) for r in _refs(ref)) else 0.0


def _anls_one(p: str, r: str, threshold: float) -> float:
    longest = max(len(p), len(r))
    if longest == 0:
        return 1.0
    nl = levenshtein(p, r) / longest
    return 1.0 - nl if nl < threshold else 0.0


def anls(pred: str | None, ref: Ref, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question, as in DocVQA (Biten et al. 2019).

    ``NL = levenshtein(pred, ref) / max(len(pred), len(ref))`` on normalized strings (characters);
    the score is ``1 - NL`` if ``NL < threshold`` else ``0``; with several references, the max.
    The mean of this over a data set is the data set's ANLS. (The official DocVQA script only
    lowercases and strips; this one also drops trailing punctuation, like the other metrics here.)
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    p = normalize_answer(pred)
    return max(_anls_one(p, normalize_answer(r), threshold) for r in _refs(ref))


def _rouge_l_one(p: list[str], r: list[str], beta: float) -> float:
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    b2 = beta * beta
    return (1.0 + b2) * precision * recall / (recall + b2 * precision)


def rouge_l(pred: str | None, ref: Ref, beta: float = ROUGE_L_BETA) -> float:
    """ROUGE-L F-measure on whitespace tokens of the normalized strings.

    ``P = LCS / len(pred_tokens)``, ``R = LCS / len(ref_tokens)``,
    ``F = (1 + beta^2) P R / (R + beta^2 P)`` with ``beta = 1.0`` by default (F1; symmetric in
    pred and ref). With several references, the max.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    p = normalize_answer(pred).split()
    return max(_rouge_l_one(p, normalize_answer(r).split(), beta) for r in _refs(ref))


def score(pred: str | None, ref: Ref) -> dict[str, float]:
    """All metrics for one prediction: ``{"exact_match": ..., "anls": ..., "rouge_l": ...}``."""
    return {"exact_match": exact_match(pred, ref), "anls": anls(pred, ref), "rouge_l": rouge_l(pred, ref)}


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, float | int | None]:
    """Means of per-sample score dicts (as :func:`score` returns) plus ``count``, the number of rows.

    Every metric in :data:`METRICS` is always present (``None`` when there are no rows); any other
    numeric key found in the rows is averaged too. A key's mean is over the rows that have it;
    non-finite values (NaN, inf) are skipped.
    """
    rows = list(rows)
    sums: dict[str, float] = {}
    ns: dict[str, int] = {}
    keys: list[str] = list(METRICS)
    for row in rows:
        for k, v in row.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if k not in sums:
                sums[k], ns[k] = 0.0, 0
                if k not in keys:
                    keys.append(k)
            sums[k] += float(v)
            ns[k] += 1
    out: dict[str, float | int | None] = {k: (sums[k] / ns[k] if ns.get(k) else None) for k in keys if k != "count"}
    out["count"] = len(rows)
    return out
