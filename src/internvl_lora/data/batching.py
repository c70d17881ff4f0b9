"""Token-budget batching: micro-batches filled to a number of tokens instead of a number of samples.

`TokenBudgetBatchSampler` is a batch sampler (it yields lists of dataset indices) for a map-style
dataset whose per-sample token lengths are known in advance (here: from the data audit). Each epoch:

1. the indices are shuffled with a generator seeded from (seed, epoch) only, never the global RNG, so
   a resumed run, or any rank, computes exactly the same batches;
2. the shuffled order is cut into chunks of about `CHUNK_BATCHES` micro-batches' worth of samples;
   each chunk is sorted by length (longest first) and packed into micro-batches within the budget:
   - `padded=False` (a packed collator: one row, no padding): a micro-batch costs the *sum* of its
     lengths; best-fit decreasing, so micro-batches come out nearly full;
   - `padded=True` (a padding collator): a micro-batch costs `samples x longest sample` (the padded
     tensor); consecutive samples of the sorted chunk, so similar lengths share a micro-batch;
3. the number of micro-batches is brought to the fixed count of the sampler (below), and their order
   is shuffled (same generator), then dealt round-robin to the ranks.

Every index is yielded exactly once per epoch (over all ranks; see below for tiny data sets), nothing
is dropped. A sample longer than the budget gets a micro-batch of its own (the run config's validation
prevents that case: the budget must be at least `data.max_length`).

A fixed number of micro-batches per epoch. The HF Trainer reads `len()` once, before training, and
assumes every epoch has that many micro-batches (resuming also computes the epoch and the position
inside it from that count). Several processes must also run the same number of micro-batches, or
DDP waits forever on the rank that has one more. So the count is fixed: epoch 0's packing plus a
small slack (packings of other epochs differ by a few micro-batches: sqrt(number of chunks), never
beyond one sample per micro-batch), rounded up to a multiple of `num_replicas`. An epoch that packs
into fewer micro-batches splits its micro-batches with the most samples in two until it has that many:
a few micro-batches per epoch are half as full, no sample is repeated. Only a data set with fewer
samples than that count (e.g. 3 samples on 4 ranks) repeats micro-batches, the smallest ones, to fill
it. The rare epoch that would need more micro-batches than the count reuses epoch 0's grouping in its
own shuffled order.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch.utils.data import Sampler

__all__ = ["TokenBudgetBatchSampler", "pack"]

CHUNK_BATCHES = 50  # micro-batches' worth of samples packed together (more: fuller, less random)


def pack(items: list[tuple[int, int]], max_tokens: int, padded: bool = False) -> list[list[int]]:
    """Pack (length, index) pairs, sorted by length descending, into lists of indices within `max_tokens`.

    `padded=False`: the sum of the lengths counts (best-fit decreasing: each sample goes to the fullest
    micro-batch that still has room). `padded=True`: samples x the longest counts (consecutive samples).
    A sample longer than `max_tokens` ends up alone.
    """
    bins: list[list[int]] = []
    if padded:
        longest = 0
        for length, i in items:
            if bins and (len(bins[-1]) + 1) * longest <= max_tokens:
                bins[-1].append(i)
            else:
                bins.append([i])
                longest = length
        return bins
    room: list[tuple[int, int]] = []  # (tokens left, bin number), ascending
    for length, i in items:
        k = bisect.bisect_left(room, (length, -1))  # the bin with the least room that still fits
        if k == len(room):
            bins.append([i])
            left, b = max_tokens - length, len(bins) - 1
        else:
            left, b = room.pop(k)
            bins[b].append(i)
            left -= length
        bisect.insort(room, (left, b))
    return bins


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of dataset indices whose token cost is at most `max_tokens` (see the module doc).

    lengths: token count of every sample (index i -> lengths[i]).
    max_tokens: the budget per micro-batch.
    seed: with the epoch (`set_epoch`), the only source of randomness.
    num_replicas, rank: the processes; every rank yields `len(self)` micro-batches, rank r every
        num_replicas-th micro-batch of the shared list.
    padded: the cost of a micro-batch is samples x longest (padding collator) instead of the sum.
    """

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 padded: bool = False):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens, self.seed = int(max_tokens), int(seed)
        self.num_replicas, self.rank, self.padded = int(num_replicas), int(rank), padded
        self.epoch = 0
        mean = sum(self.lengths) / len(self.lengths) if self.lengths else 1
        self.chunk = max(1, round(CHUNK_BATCHES * self.max_tokens / max(mean, 1)))  # samples per chunk
        self._epoch0: list[list[int]] | None = None  # epoch 0's packing (defines the count)
        self._total: int | None = None  # micro-batches per epoch, all ranks together
        self._cache: tuple[int, list[list[int]]] | None = None  # (epoch, its micro-batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.total_batches() // self.num_replicas

    def __iter__(self):
        return iter(self.batches(self.epoch)[self.rank::self.num_replicas])

    # -- the packing ---------------------------------------------------------------------------------
    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def _pack_epoch(self, epoch: int, g: torch.Generator) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        bins: list[list[int]] = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(((self.lengths[i], i) for i in order[start:start + self.chunk]),
                           key=lambda x: -x[0])  # stable: equal lengths keep the shuffled order
            bins += pack(chunk, self.max_tokens, self.padded)
        return bins

    def total_batches(self) -> int:
        """Micro-batches per epoch over all ranks: the same for every epoch (see the module doc)."""
        if self._total is None:
            self._epoch0 = self._pack_epoch(0, self._generator(0))
            chunks = math.ceil(len(self.lengths) / self.chunk)
            slack = 0 if chunks <= 1 else math.ceil(math.sqrt(chunks))  # one chunk: the count never varies
            total = min(len(self._epoch0) + slack, max(len(self._epoch0), len(self.lengths)))  # no repeat for slack
            self._total = math.ceil(total / self.num_replicas) * self.num_replicas
        return self._total

    def batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches of an epoch (every rank's), in order; rank r takes [r::num_replicas]."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        total = self.total_batches()
        g = self._generator(epoch)
        bins = self._epoch0 if epoch == 0 else self._pack_epoch(epoch, g)
        if len(bins) > total:  # rare: this epoch's packing needs more micro-batches than the count
            bins = self._epoch0
        bins = _fill_to(bins, total, self.lengths)
        shuffled = [bins[k] for k in torch.randperm(len(bins), generator=g).tolist()]
        self._cache = (epoch, shuffled)
        return shuffled


def _fill_to(bins: list[list[int]], total: int, lengths: list[int]) -> list[list[int]]:
    """`total` micro-batches from `bins`: split the ones with the most samples in two (halves of the
    length-sorted list, so the padded cost does not grow); repeat the smallest ones when no micro-batch
    holds two samples any more (a data set with fewer samples than `total`)."""
    bins = [list(b) for b in bins]
    while 0 < len(bins) < total:
        k = max(range(len(bins)), key=lambda j: len(bins[j]))
        if len(bins[k]) > 1:
            half = len(bins[k]) // 2
            bins.append(bins[k][half:])
            bins[k] = bins[k][:half]
        else:
            smallest = sorted(bins, key=lambda b: sum(lengths[i] for i in b))
            bins += smallest[:total - len(bins)]
    return bins
