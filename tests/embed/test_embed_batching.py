"""Token-budget batching: budgets hold, every index appears exactly once, buckets stay bounded."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wave_rt.embed.batching import BucketBatcher, plan_batches


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 5000), min_size=0, max_size=300),
       budget=st.integers(1, 20000), batch_size=st.one_of(st.none(), st.integers(1, 64)))
def test_plan_batches_partitions_under_budget(lengths, budget, batch_size):
    batches = plan_batches(lengths, budget, batch_size)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or longest * len(b) <= budget
        assert batch_size is None or len(b) <= batch_size


def test_plan_batches_sorts_by_length_and_rejects_bad_budgets():
    lengths = [5, 100, 7, 100, 6]
    batches = plan_batches(lengths, 200, None)
    assert batches[0] == [1, 3]  # longest first, ties by index
    assert [i for b in batches for i in b] == [1, 3, 2, 4, 0]
    with pytest.raises(ValueError):
        plan_batches(lengths, 0, None)
    with pytest.raises(ValueError):
        plan_batches(lengths, None, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_batcher_streams_every_key_once_within_budget(seed):
    rng = random.Random(seed)
    budget = 4096
    batcher = BucketBatcher(budget, max_batch_size=32, max_pending=200)
    lengths = {k: rng.choice([rng.randint(5, 60), rng.randint(200, 900), rng.randint(1500, 5000)]) for k in range(3000)}
    seen = []
    peak = 0
    for k, n in lengths.items():
        for batch in batcher.add(k, n):
            seen.append(batch)
        peak = max(peak, len(batcher))
    seen += batcher.flush()
    assert len(batcher) == 0
    assert peak <= 201
    keys = [k for b in seen for k in b]
    assert sorted(keys) == list(lengths)
    for b in seen:
        assert len(b) <= 32
        assert len(b) == 1 or max(lengths[k] for k in b) * len(b) <= budget


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 5000), min_size=0, max_size=300), budget=st.integers(1, 20000))
def test_packed_plan_counts_real_tokens(lengths, budget):
    """Packed batches: sum of real tokens <= budget (one over-long item alone), and never more batches than
    the padded plan of the same budget needs."""
    batches = plan_batches(lengths, budget, None, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget
    assert len(batches) <= len(plan_batches(lengths, budget, None))


def test_packed_bucket_batcher_counts_real_tokens():
    rng = random.Random(5)
    batcher = BucketBatcher(1000, packed=True)
    lengths = {k: rng.randint(5, 400) for k in range(500)}
    seen = [b for k, n in lengths.items() for b in batcher.add(k, n)] + batcher.flush()
    assert sorted(k for b in seen for k in b) == list(lengths)
    assert all(len(b) == 1 or sum(lengths[k] for k in b) <= 1000 for b in seen)


class _ScanningBucketBatcher(BucketBatcher):
    """The reference rule: a bucket's tokens and longest item recomputed from its items at every add."""

    def _fits(self, k, n):
        bucket = self._buckets[k]
        if not bucket:
            return True
        if self.max_batch_size is not None and len(bucket) + 1 > self.max_batch_size:
            return False
        if self.packed:
            return n + sum(m for _, m in bucket) <= self.max_batch_tokens
        return max(n, max(m for _, m in bucket)) * (len(bucket) + 1) <= self.max_batch_tokens


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=0, max_size=400), budget=st.integers(1, 8000),
       packed=st.booleans(), batch_size=st.one_of(st.none(), st.integers(1, 40)), max_pending=st.integers(1, 120))
def test_bucket_batcher_running_totals_equal_the_scanning_rule(lengths, budget, packed, batch_size, max_pending):
    """The kept per-bucket sums and maxima (O(1) per add) release exactly the batches that rescanning the bucket
    at every add releases, through full buckets, max_pending releases and flushes."""
    fast = BucketBatcher(budget, batch_size, max_pending=max_pending, packed=packed)
    ref = _ScanningBucketBatcher(budget, batch_size, max_pending=max_pending, packed=packed)
    for k, n in enumerate(lengths):
        assert fast.add(k, n) == ref.add(k, n)
        if k % 97 == 96:
            assert fast.flush() == ref.flush()
    assert fast.flush() == ref.flush()
