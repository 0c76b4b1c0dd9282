"""GradCache (Gao et al. 2021; sentence-transformers' CachedMultipleNegativesRankingLoss): a contrastive
batch of any size in the activation memory of one chunk.

1. Every chunk of every side (queries, targets) is embedded without a graph; the RNG state at the start
   of each chunk is kept.
2. The loss runs once on the detached, concatenated embeddings (the info_nce kernel: no B x M logits),
   and its backward gives d loss / d embedding for every row (and the gradient of loss-side parameters
   such as a learnable temperature).
3. Every chunk is embedded again with a graph under its saved RNG state (same dropout masks as in step
   1, so the cached gradient belongs to this very forward), and `embedding.backward(cached gradient)`
   accumulates the parameter gradients. A chunk whose re-embedding has no graph (no trainable parameter
   on its path: text targets skip WAVE's fusion head, so with trainable = "heads" they reach nothing) has
   a zero parameter gradient and gets no backward; the loss still used its embeddings.

By the chain rule the accumulated gradients equal the full-batch graph's; tests/train/test_gradcache.py
checks it in float64 for every recipe and chunk sizes 1, 3 and B. The cost is one extra forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RngState:
    """The CPU and every CUDA device's generator state at one point (torch.utils.checkpoint keeps the same)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RngState:
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this state; the caller's generators are untouched afterwards."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            for i, state in enumerate(self.cuda):
                torch.cuda.set_rng_state(state, i)
            yield


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def gradcache_step(
    encode: Callable[[Any], torch.Tensor],
    sides: Sequence[Sequence[Any]],
    loss_fn: Callable[..., torch.Tensor],
    before_backward: Callable[[bool], None] | None = None,
) -> torch.Tensor:
    """One GradCache forward/backward; parameter gradients are ACCUMULATED into `.grad` (zero them first).

    encode(chunk) -> [n, D] embeddings of one chunk (with its graph when grad mode is on).
    sides[k] is the list of chunks of side k (e.g. [query chunks, target chunks]); their embeddings are
    concatenated per side in order and passed to loss_fn(side_0, side_1, ...) -> 0-dim loss.
    before_backward(last) runs before each chunk's backward, last=True before the step's final one (FSDP2
    reduces the accumulated gradients only then). A chunk whose embeddings have no graph gets no backward;
    when the step's last chunks have none, the latest chunk that had one runs again after before_backward(True)
    with a zero gradient. Returns the detached loss."""
    cached: list[list[tuple[RngState, int]]] = []
    reps: list[torch.Tensor] = []
    with torch.no_grad():
        for chunks in sides:
            states, parts = [], []
            for chunk in chunks:
                state = RngState.capture()
                emb = encode(chunk)
                states.append((state, emb.shape[0]))
                parts.append(emb)
            cached.append(states)
            reps.append(torch.cat(parts).detach().requires_grad_(True))
    loss = loss_fn(*reps)
    loss.backward()
    remaining = sum(len(chunks) for chunks in sides)
    last_graph: tuple[Any, RngState] | None = None  # the latest chunk whose backward ran
    synced = False
    for chunks, states, rep in zip(sides, cached, reps):
        grads = rep.grad.split([n for _, n in states])
        for chunk, (state, n), grad in zip(chunks, states, grads):
            with state.replay():
                emb = encode(chunk)
            if emb.shape[0] != n:
                raise RuntimeError(f"chunk re-embedding gave {emb.shape[0]} rows, the cached pass {n}")
            remaining -= 1
            if not emb.requires_grad:
                # No trainable parameter on this chunk's path (e.g. text targets, which skip the fusion head,
                # when only heads train): its parameter gradient is zero; the loss above still used its rows.
                continue
            if before_backward is not None:
                before_backward(remaining == 0)
            emb.backward(grad.to(emb.dtype))
            last_graph, synced = (chunk, state), remaining == 0
    if before_backward is not None and last_graph is not None and not synced:
        # The step's final chunks had no graph, so no backward was flagged last and FSDP2 never reduced the
        # accumulated gradients. One more backward of the latest chunk that had a graph, with a zero output
        # gradient, adds exactly nothing and carries that reduction.
        chunk, state = last_graph
        with state.replay():
            emb = encode(chunk)
        before_backward(True)
        emb.backward(torch.zeros_like(emb))
    return loss.detach()


def full_batch_step(
    encode: Callable[[Any], torch.Tensor],
    sides: Sequence[Sequence[Any]],
    loss_fn: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The uncached reference: every chunk embedded with its graph kept, one backward through everything.
    Memory grows with the whole batch; GradCache must give the same loss and gradients."""
    reps = [torch.cat([encode(chunk) for chunk in chunks]) for chunks in sides]
    loss = loss_fn(*reps)
    if loss.requires_grad:  # False only when no trainable parameter is reached (see gradcache_step)
        loss.backward()
    return loss.detach()
