"""Tests for internvl_lora.metrics: hand-computed values, edge cases, hypothesis properties."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from internvl_lora.metrics import (
    METRICS,
    ROUGE_L_BETA,
    aggregate,
    anls,
    exact_match,
    lcs_length,
    levenshtein,
    normalize_answer,
    rouge_l,
    score,
)

# ------------------------------------------------------------------------------ normalize_answer


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Paris", "paris"),
        ("  Paris.  ", "paris"),
        ("paris!!", "paris"),
        ("Paris .", "paris"),  # whitespace before the punctuation goes too
        ("New\tYork\n City", "new york city"),
        ("(a) 3.5", "(a) 3.5"),  # leading / inner punctuation kept
        ("3.5", "3.5"),
        ("yes, it is.", "yes, it is"),
        ("是。", "是"),  # Unicode punctuation
        ("...", ""),
        ("", ""),
        ("   ", ""),
        (None, ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# ----------------------------------------------------------------------------------- levenshtein


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("saturday", "sunday", 3),
        ("intention", "execution", 5),
        ("abc", "abc", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("abc", "cba", 2),
        ("a", "b", 1),
    ],
)
def test_levenshtein_known(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ("ABCBDAB", "BDCABA", 4),  # CLRS example: BCBA
        ("AGGTAB", "GXTXAYB", 4),  # GTAB
        ("abc", "", 0),
        ("abc", "def", 0),
        ("the cat sat on the mat".split(), "the cat on a mat".split(), 4),
    ],
)
def test_lcs_known(a, b, n):
    assert lcs_length(a, b) == n
    assert lcs_length(b, a) == n


# ----------------------------------------------------------------------------------- exact_match


def test_exact_match_basic():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("  PARIS ", "Paris!") == 1.0
    assert exact_match("Paris, France", "paris") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "a") == 0.0
    assert exact_match(None, "a") == 0.0
    assert exact_match(None, "") == 1.0


def test_exact_match_list_is_max():
    assert exact_match("two", ["2", "Two."]) == 1.0
    assert exact_match("three", ["2", "two"]) == 0.0
    assert exact_match("two", ("2", "two")) == 1.0


def test_empty_reference_list_raises():
    for fn in (exact_match, anls, rouge_l, score):
        with pytest.raises(ValueError):
            fn("a", [])


# ------------------------------------------------------------------------------------------ anls


def test_anls_known():
    # kitten/sitting: distance 3, longest 7 -> NL = 3/7 < 0.5 -> 1 - 3/7 = 4/7
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls("abc", "abd") == pytest.approx(2 / 3)  # NL = 1/3
    assert anls("Paris.", "paris") == 1.0
    assert anls("ab", "ac") == 0.0  # NL = 0.5 exactly: not < 0.5
    assert anls("ab", "ac", threshold=0.6) == pytest.approx(0.5)
    assert anls("abcd", "wxyz") == 0.0
    # case/whitespace normalized before the distance: "the  CAT" == "the cat"
    assert anls("the  CAT", "the cat") == 1.0


def test_anls_empty():
    assert anls("", "") == 1.0
    assert anls("", "a") == 0.0
    assert anls("a", "") == 0.0
    assert anls(None, "abc") == 0.0


def test_anls_list_is_max():
    assert anls("kitten", ["dog", "sitting", "kitchen"]) == pytest.approx(max(4 / 7, 1 - 2 / 7))
    assert anls("kitten", ["dog", "cat"]) == 0.0


def test_anls_bad_threshold():
    with pytest.raises(ValueError):
        anls("a", "a", threshold=1.5)


# --------------------------------------------------------------------------------------- rouge_l


def test_rouge_l_known():
    # LCS("the cat sat on the mat", "the cat on a mat") = 4 ("the cat on mat")
    # P = 4/6, R = 4/5, F1 = 2PR/(P+R) = 8/11
    assert ROUGE_L_BETA == 1.0
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(8 / 11)
    # beta = 2: (1+4)PR / (R + 4P) = 10/13
    assert rouge_l("the cat sat on the mat", "the cat on a mat", beta=2.0) == pytest.approx(10 / 13)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)  # LCS 1, P = R = 1/3
    assert rouge_l("The Cat.", "the cat") == 1.0
    assert rouge_l("x y", "a b") == 0.0


def test_rouge_l_empty():
    assert rouge_l("", "") == 1.0
    assert rouge_l("...", "") == 1.0  # normalizes to empty
    assert rouge_l("", "a") == 0.0
    assert rouge_l("a", "") == 0.0


def test_rouge_l_list_is_max():
    assert rouge_l("a b c d", ["x", "a b", "a b c d"]) == 1.0
    assert rouge_l("a b c d", ["x", "a b"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))


# ------------------------------------------------------------------------------- score/aggregate


def test_score_keys_and_values():
    s = score("Yellow.", "yellow")
    assert list(s) == list(METRICS)
    assert s == {"exact_match": 1.0, "anls": 1.0, "rouge_l": 1.0}
    s = score("kitten", "sitting")
    assert s["exact_match"] == 0.0 and s["anls"] == pytest.approx(4 / 7) and s["rouge_l"] == 0.0


def test_aggregate_means():
    rows = [score("a", "a"), score("b", "a"), score("kitten", "sitting")]
    agg = aggregate(rows)
    assert agg["count"] == 3
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["anls"] == pytest.approx((1 + 0 + 4 / 7) / 3)
    assert agg["rouge_l"] == pytest.approx(1 / 3)


def test_aggregate_empty_and_extras():
    assert aggregate([]) == {"exact_match": None, "anls": None, "rouge_l": None, "count": 0}
    agg = aggregate([{"exact_match": 1.0, "latency": 2.0}, {"exact_match": 0.0, "latency": float("nan"), "note": "x"},
                     {"exact_match": 1.0, "latency": 4.0}])
    assert agg["exact_match"] == pytest.approx(2 / 3)
    assert agg["latency"] == pytest.approx(3.0)  # NaN skipped
    assert agg["anls"] is None and "note" not in agg
    assert agg["count"] == 3
    assert aggregate(iter([score("a", "a")]))["count"] == 1  # any iterable


# ---------------------------------------------------------------------------------- properties

texts = st.text(max_size=24)
wordy = st.lists(st.sampled_from(["a", "b", "cat", "The", "mat.", "on", " ", "\n", "!"]), max_size=10).map("".join)
any_text = st.one_of(texts, wordy)


@lru_cache(maxsize=None)
def _lev_ref(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_lev_ref(a[1:], b) + 1, _lev_ref(a, b[1:]) + 1, _lev_ref(a[1:], b[1:]) + (a[0] != b[0]))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcd", max_size=7), st.text(alphabet="abcd", max_size=7))
def test_levenshtein_matches_reference(a, b):
    assert levenshtein(a, b) == _lev_ref(a, b)


@settings(max_examples=100, deadline=None)
@given(texts, texts, texts)
def test_levenshtein_metric_properties(a, b, c):
    d = levenshtein(a, b)
    assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
    assert d == levenshtein(b, a)
    assert (d == 0) == (a == b)
    assert levenshtein(a, c) <= d + levenshtein(b, c)


@settings(max_examples=100, deadline=None)
@given(any_text, any_text)
def test_metric_ranges_and_symmetry(a, b):
    for name, fn in (("exact_match", exact_match), ("anls", anls), ("rouge_l", rouge_l)):
        v = fn(a, b)
        assert 0.0 <= v <= 1.0 and not math.isnan(v), name
        assert v == pytest.approx(fn(b, a)), name  # all three are symmetric (ROUGE-L with beta = 1)
    assert exact_match(a, b) <= anls(a, b)  # an exact match always has ANLS 1
    assert exact_match(a, b) <= rouge_l(a, b)


@settings(max_examples=100, deadline=None)
@given(any_text)
def test_identical_is_one(a):
    assert score(a, a) == {"exact_match": 1.0, "anls": 1.0, "rouge_l": 1.0}
    # case, surrounding whitespace and trailing punctuation do not matter
    if a.upper().lower() == a.lower():  # not so for e.g. "ß" -> "SS" -> "ss"
        assert score(a, "  " + a.upper() + " ?!") == {"exact_match": 1.0, "anls": 1.0, "rouge_l": 1.0}


@settings(max_examples=100, deadline=None)
@given(any_text)
def test_normalize_idempotent(a):
    n = normalize_answer(a)
    assert normalize_answer(n) == n
    assert n == n.strip() and "  " not in n


@settings(max_examples=60, deadline=None)
@given(any_text, st.lists(any_text, min_size=1, max_size=4))
def test_multi_reference_is_max(pred, refs):
    for fn in (exact_match, anls, rouge_l):
        assert fn(pred, refs) == max(fn(pred, r) for r in refs)
