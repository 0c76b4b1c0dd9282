"""One home for running prepared batches through the model with out-of-memory splitting: used by
WaveEncoder.encode and by both archive engines (local pipeline, Ray actors)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from wave_rt.errors import BatchTooLargeError

log = logging.getLogger(__name__)

OutOfMemory: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
# what a smaller batch may avoid: memory, or the shape ranges an engine was built for
TOO_LARGE: tuple[type[BaseException], ...] = (OutOfMemory, BatchTooLargeError)


class ModelRunner:
    """embed_prepared with adaptive batch splitting: an out-of-memory error halves the batch and lowers
    the token cap for later batches; the cap grows back by 25% after every `regrow_after` clean batches.

    isolate_errors: any other exception from a multi-item batch is bisected down to the item that raises
    it, which is reported (the archive job: one bad item never kills a batch); False re-raises at once
    (WaveEncoder.encode, whose caller gets the exception)."""

    def __init__(self, encoder: Any, max_batch_tokens: int, normalize: bool = True, regrow_after: int = 50,
                 max_consecutive_failures: int = 8, isolate_errors: bool = True) -> None:
        self.encoder = encoder
        self.isolate_errors = isolate_errors
        self.budget = max_batch_tokens
        self.cap = max_batch_tokens
        self.normalize = normalize
        self.regrow_after = regrow_after
        self.max_consecutive_failures = max_consecutive_failures
        self.oom_splits = 0
        self.batches = 0
        self._clean = 0
        self._consecutive_failures = 0
        self._lock = threading.Lock()

    def run(self, prepared: list[Any]) -> tuple[dict[int, np.ndarray], dict[int, BaseException]]:
        """Embed a batch; returns ({index: embedding}, {index: exception}) covering every index."""
        emb, good, failed = self.run_block(prepared)
        return {i: emb[j] for j, i in enumerate(good)}, failed

    def run_block(self, prepared: list[Any]) -> tuple[np.ndarray, list[int], dict[int, BaseException]]:
        """Embed a batch; returns (float32 [len(good), dim] in input order, the indices that succeeded in
        ascending order, {index: exception}); `good` and the exceptions cover every index. The archive's
        form: one array per batch, not a vector per item to stack again."""
        out: list[np.ndarray] = []  # the [n, dim] result, made by the first forward that succeeds
        done = np.zeros(len(prepared), dtype=bool)
        failed: dict[int, BaseException] = {}
        self._run(prepared, list(range(len(prepared))), out, done, failed)
        good = np.flatnonzero(done)
        if not out:
            return np.empty((0, 0), np.float32), [], failed
        return (out[0] if len(good) == len(prepared) else out[0][good]), good.tolist(), failed

    def tokens(self, batch: list[Any]) -> int:
        """Tokens one forward over `batch` processes (what the cap bounds)."""
        return self._padded(batch, list(range(len(batch))))

    def _padded(self, prepared: list[Any], idx: list[int]) -> int:
        """Tokens the forward processes: the real tokens in a packed batch, the padded rectangle otherwise."""
        if getattr(self.encoder, "packed", False):
            return sum(int(prepared[i].num_tokens) for i in idx)
        return len(idx) * max(int(prepared[i].num_tokens) for i in idx)

    def _split(self, prepared: list[Any], idx: list[int], out: list[np.ndarray], done: np.ndarray,
               failed: dict[int, BaseException]) -> None:
        """The two halves of a batch by length (longest first), so that each half's padding stays small;
        a batch that is not split runs in its own order (a forward does not care)."""
        order = sorted(idx, key=lambda i: -int(prepared[i].num_tokens))
        half = len(order) // 2
        self._run(prepared, order[:half], out, done, failed)
        self._run(prepared, order[half:], out, done, failed)

    def _run(self, prepared: list[Any], idx: list[int], out: list[np.ndarray], done: np.ndarray,
             failed: dict[int, BaseException]) -> None:
        if len(idx) > 1 and self._padded(prepared, idx) > self.cap:
            self._split(prepared, idx, out, done, failed)
            return
        try:
            emb = self.encoder.embed_prepared([prepared[i] for i in idx], normalize=self.normalize)
        except TOO_LARGE as exc:
            self._release_memory()
            with self._lock:
                self.oom_splits += 1
                self._clean = 0
                if len(idx) > 1:
                    self.cap = max(1, min(self.cap, self._padded(prepared, idx) // 2))
            if len(idx) == 1:
                log.warning("%s on a single item of %d tokens", _what(exc), int(prepared[idx[0]].num_tokens))
                failed[idx[0]] = exc
                return
            log.warning("%s on a batch of %d (%d padded tokens): splitting; token cap now %d", _what(exc),
                        len(idx), self._padded(prepared, idx), self.cap)
            self._split(prepared, idx, out, done, failed)
            return
        except Exception as exc:  # noqa: BLE001 - isolate the item that breaks the forward
            if not self.isolate_errors:
                raise
            if len(idx) > 1:
                self._split(prepared, idx, out, done, failed)
                return
            with self._lock:
                self._consecutive_failures += 1
                fatal = self._consecutive_failures >= self.max_consecutive_failures
            if fatal:
                raise
            log.warning("model failed on one item: %s", exc)
            failed[idx[0]] = exc
            return
        emb = emb.detach().to("cpu", torch.float32).numpy()
        if len(idx) == len(done):
            out.append(emb)  # the whole batch at once, in its order
        else:
            if not out:
                out.append(np.empty((len(done), emb.shape[1]), np.float32))
            out[0][idx] = emb
        done[idx] = True
        with self._lock:
            self.batches += 1
            self._consecutive_failures = 0
            self._clean += 1
            if self.cap < self.budget and self._clean >= self.regrow_after:
                self.cap = min(self.budget, int(self.cap * 1.25) + 1)
                self._clean = 0

    def _release_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _what(exc: BaseException) -> str:
    return "out of memory" if isinstance(exc, OutOfMemory) else f"too large for the engine ({exc})"
