"""TokenBudgetBatchSampler: every index once per epoch, the budget, a fixed batch count per epoch and
per rank, determinism by (seed, epoch), and how full the micro-batches are."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from internvl_lora.data.batching import TokenBudgetBatchSampler, _fill_to, pack


def cost(batch, lengths, padded):
    return len(batch) * max(lengths[i] for i in batch) if padded else sum(lengths[i] for i in batch)


def epoch_batches(lengths, budget, seed=0, epoch=0, replicas=1, padded=False):
    """Every rank's micro-batches of one epoch, from fresh samplers."""
    out = []
    for r in range(replicas):
        s = TokenBudgetBatchSampler(lengths, budget, seed, num_replicas=replicas, rank=r, padded=padded)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


lengths_st = st.lists(st.integers(1, 600), min_size=0, max_size=400)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 2000), seed=st.integers(0, 2**20), epoch=st.integers(0, 5),
       padded=st.booleans())
def test_one_replica_every_index_exactly_once_within_the_budget(lengths, budget, seed, epoch, padded):
    (batches,) = epoch_batches(lengths, budget, seed, epoch, padded=padded)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b, "empty micro-batch"
        if len(b) > 1:  # alone, a sample may be longer than the budget; together they fit
            assert cost(b, lengths, padded) <= budget, (b, [lengths[i] for i in b])


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, budget=st.integers(600, 3000), seed=st.integers(0, 1000), epoch=st.integers(0, 3),
       replicas=st.integers(2, 8), padded=st.booleans())
def test_replicas_get_equal_counts_and_together_cover_every_index(lengths, budget, seed, epoch, replicas, padded):
    per_rank = epoch_batches(lengths, budget, seed, epoch, replicas, padded)
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, [len(b) for b in per_rank]
    seen = Counter(i for rank in per_rank for b in rank for i in b)
    assert set(seen) == set(range(len(lengths)))  # nothing dropped
    if len(lengths) >= counts.pop() * replicas:
        assert set(seen.values()) <= {1}  # enough samples: splitting, never repeating
    for rank in per_rank:
        for b in rank:
            assert len(b) == 1 or cost(b, lengths, padded) <= budget


def test_a_sample_longer_than_the_budget_is_alone_and_kept():
    lengths = [100, 5000, 200, 300, 9000, 50]
    for padded in (False, True):
        (batches,) = epoch_batches(lengths, 1000, padded=padded)
        assert [1] in batches and [4] in batches
        assert sorted(i for b in batches for i in b) == list(range(6))


def test_len_equals_the_yielded_count_and_is_the_same_every_epoch():
    rnd = random.Random(3)
    lengths = [rnd.randint(20, 900) for _ in range(3000)]  # several chunks: the packings differ by epoch
    for replicas in (1, 3):
        s = TokenBudgetBatchSampler(lengths, 2048, seed=5, num_replicas=replicas, rank=replicas - 1)
        n = len(s)
        raw = set()
        for epoch in range(8):
            s.set_epoch(epoch)
            assert len(s) == n == len(list(s)), epoch
            raw.add(len(s._pack_epoch(epoch, s._generator(epoch))))
        assert len(raw) > 1  # the count is fixed although the packings are not


def test_order_depends_only_on_seed_and_epoch():
    lengths = [random.Random(1).randint(10, 500) for _ in range(500)]
    torch.manual_seed(0)
    random.seed(0)
    a = epoch_batches(lengths, 1500, seed=7, epoch=2)
    torch.manual_seed(123)  # the global RNGs play no part
    random.seed(123)
    torch.rand(10)
    b = epoch_batches(lengths, 1500, seed=7, epoch=2)
    assert a == b
    assert epoch_batches(lengths, 1500, seed=7, epoch=3) != a
    assert epoch_batches(lengths, 1500, seed=8, epoch=2) != a
    # one sampler moved through epochs gives what a fresh one (a resumed run) gives
    s = TokenBudgetBatchSampler(lengths, 1500, seed=7)
    for epoch in range(3):
        s.set_epoch(epoch)
        got = list(s)
    assert [got] == a


def test_similar_lengths_share_a_padded_micro_batch():
    rnd = random.Random(0)
    lengths = [rnd.choice([50, 1000]) + rnd.randint(0, 20) for _ in range(400)]
    (batches,) = epoch_batches(lengths, 4096, padded=True)
    mixed = [b for b in batches if {lengths[i] >= 1000 for i in b} == {True, False}]
    assert len(mixed) <= 2  # at most the chunk boundary between short and long


@pytest.mark.parametrize("padded, floor", [(False, 0.9), (True, 0.85)])
def test_micro_batches_are_nearly_full(padded, floor):
    rnd = random.Random(0)
    lengths = [rnd.randint(100, 1000) for _ in range(5000)]
    (batches,) = epoch_batches(lengths, 4096, seed=1, epoch=1, padded=padded)
    fill = sum(lengths) / (len(batches) * 4096)
    assert fill >= floor, fill
    if padded:  # little padding: the tokens are mostly real
        assert sum(lengths) / sum(cost(b, lengths, True) for b in batches) >= 0.95


def test_an_epoch_that_needs_more_batches_than_the_count_reuses_epoch_0s_grouping():
    class Greedy(TokenBudgetBatchSampler):
        def _pack_epoch(self, epoch, g):
            bins = super()._pack_epoch(epoch, g)
            return bins if epoch == 0 else [[i] for b in bins for i in b]  # one sample per batch

    lengths = [random.Random(2).randint(10, 300) for _ in range(4000)]
    s = Greedy(lengths, 1000, seed=0, num_replicas=2, rank=1)
    s.set_epoch(1)
    got = list(s)
    assert len(got) == len(s)
    groups0 = {tuple(b) for b in s.batches(0)}
    assert {tuple(b) for b in s.batches(1)} == groups0  # the same grouping
    assert s.batches(1) != s.batches(0)  # in another order


def test_fill_to_splits_before_it_repeats():
    lengths = [5, 4, 3, 2, 1]
    assert sorted(map(sorted, _fill_to([[0, 1, 2, 3], [4]], 3, lengths))) == [[0, 1], [2, 3], [4]]
    filled = _fill_to([[0], [1]], 3, lengths)  # one sample per batch already: the smallest is repeated
    assert filled == [[0], [1], [1]]


def test_pack_best_fit_and_padded_cost():
    assert pack([(6, 0), (5, 1), (4, 2), (3, 3), (2, 4)], 10) == [[0, 2], [1, 3, 4]]
    assert pack([(6, 0), (4, 1), (4, 2), (1, 3)], 10) == [[0, 1], [2, 3]]  # best fit: 1 goes next to the 4
    assert pack([(6, 0), (4, 1), (4, 2), (1, 3)], 10, padded=True) == [[0], [1, 2], [3]]  # 2 x 6 > 10


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler([1, 2], 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        TokenBudgetBatchSampler([1, 2], 10, seed=0, num_replicas=2, rank=2)
    assert list(TokenBudgetBatchSampler([], 10, seed=0)) == [] and len(TokenBudgetBatchSampler([], 10, seed=0)) == 0
