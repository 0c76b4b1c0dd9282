"""Length-bucketed batching under a token budget: offline (encode) and online (streaming jobs).

For a packed forward (the default of WaveEncoder) the budget counts real tokens, sum(len): that is what
it computes and holds. For the left-padded reference forward it counts B * max_len; sorting by length
keeps that padding small.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence


def plan_batches(lengths: Sequence[int], max_batch_tokens: int | None, batch_size: int | None,
                 packed: bool = False) -> list[list[int]]:
    """Indices grouped into batches, longest first; each batch's tokens <= max_batch_tokens (sum(len) when
    `packed`, else B * max_len) and B <= batch_size (when given). An item longer than the budget gets a
    batch of its own."""
    if max_batch_tokens is not None and max_batch_tokens <= 0:
        raise ValueError("max_batch_tokens must be positive")
    if batch_size is not None and batch_size <= 0:
        raise ValueError("batch_size must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in order:
        n = lengths[i]
        new_longest = max(longest, n)
        cost = total + n if packed else new_longest * (len(current) + 1)
        too_many = batch_size is not None and len(current) + 1 > batch_size
        too_big = max_batch_tokens is not None and cost > max_batch_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current, new_longest, total = [], n, 0
        current.append(i)
        longest = new_longest
        total += n
    if current:
        batches.append(current)
    return batches


class BucketBatcher:
    """Online batching for streams: items wait in length buckets (geometric edges) and a bucket is
    released as a batch as soon as one more item would break the budget. Memory is bounded by
    max_pending: past it, the fullest bucket is released early."""

    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_size: int | None = None,
        num_buckets: int = 8,
        max_pending: int = 4096,
        min_length: int = 16,
        packed: bool = False,
    ) -> None:
        if max_batch_tokens <= 0:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.packed = packed  # budget counts real tokens (a packed forward) instead of B * longest
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        # Geometric bucket edges between min_length and the budget: similar lengths share a bucket.
        edges = []
        edge = float(min_length)
        ratio = max(2.0, (max_batch_tokens / min_length) ** (1.0 / max(1, num_buckets - 1)))
        for _ in range(num_buckets - 1):
            edges.append(int(edge))
            edge *= ratio
        self._edges = edges
        self._buckets: list[list[tuple[Hashable, int]]] = [[] for _ in range(num_buckets)]
        # each bucket's token sum and longest item, kept as items come: _fits is O(1), not O(bucket)
        self._sums = [0] * num_buckets
        self._longest = [0] * num_buckets
        self._pending = 0

    def _bucket_of(self, n: int) -> int:
        return bisect.bisect_left(self._edges, n)  # the first bucket whose edge is >= n (the last: none is)

    def _fits(self, k: int, n: int) -> bool:
        bucket = self._buckets[k]
        if not bucket:
            return True
        size = len(bucket) + 1
        if self.max_batch_size is not None and size > self.max_batch_size:
            return False
        if self.packed:
            return n + self._sums[k] <= self.max_batch_tokens
        return max(n, self._longest[k]) * size <= self.max_batch_tokens

    def _release(self, k: int) -> list[Hashable]:
        batch = [key for key, _ in self._buckets[k]]
        self._pending -= len(batch)
        self._buckets[k] = []
        self._sums[k] = self._longest[k] = 0
        return batch

    def add(self, key: Hashable, num_tokens: int) -> list[list[Hashable]]:
        """Queue one item; return the batches that became full."""
        out: list[list[Hashable]] = []
        k = self._bucket_of(num_tokens)
        if not self._fits(k, num_tokens):
            out.append(self._release(k))
        self._buckets[k].append((key, num_tokens))
        self._sums[k] += num_tokens
        self._longest[k] = max(self._longest[k], num_tokens)
        self._pending += 1
        if self._pending > self.max_pending:
            fullest = max(range(len(self._buckets)), key=lambda b: len(self._buckets[b]))
            out.append(self._release(fullest))
        return out

    def flush(self) -> list[list[Hashable]]:
        """Everything still queued, as batches (each within the budget)."""
        out: list[list[Hashable]] = []
        for k in range(len(self._buckets)):
            if self._buckets[k]:
                items = self._buckets[k]
                self._buckets[k] = []
                self._sums[k] = self._longest[k] = 0
                self._pending -= len(items)
                lengths = [n for _, n in items]
                for group in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size, packed=self.packed):
                    out.append([items[i][0] for i in sorted(group)])
        return out

    def __len__(self) -> int:
        return self._pending
