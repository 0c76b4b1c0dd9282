"""The local engine: decode workers -> length-bucketed batches under a token budget -> model -> writer.

    feeder ──work_q──> decode workers (threads: probe, decode, features, tokenize = encoder.prepare)
           ──ready_q──> batcher (BucketBatcher: similar lengths share a batch, B x longest <= budget)
           ──batch_q──> model thread(s) (embed_prepared; on CUDA each thread has its own stream, so one
                        batch's host->device copy and collation overlap the other's compute)
           ──writer──>  shards + errors.jsonl

Every queue is bounded and the batcher holds at most `max_pending_tokens` tokens, so memory stays
flat whatever the source's length. Out-of-memory errors split the batch and lower the token cap
(raised again slowly after successes); an item that fails alone is reported, not fatal.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wave_rt.archive.journal import ErrorRecord
from wave_rt.archive.shards import Row
from wave_rt.archive.sources import AUDIO_EXTS, SourceItem
from wave_rt.archive.writer import ArchiveWriter, RowBlock
from wave_rt.embed.runner import ModelRunner
from wave_rt.errors import InputError, MediaError, WaveRTError

log = logging.getLogger(__name__)

_DONE = object()


# ---------------------------------------------------------------------------------------------- items
def _probe_streams(path: str) -> tuple[bool, bool]:
    """(has_audio, has_video) of a media file. Uses wave_rt.media.probe; raises MediaError subclasses."""
    from wave_rt import media

    info = media.probe(path)
    return bool(info.has_audio), bool(info.has_video)


def resolve_modality(src: SourceItem, probe: Callable[[str], tuple[bool, bool]] = _probe_streams) -> str:
    """The modality an item is embedded as. 'auto' on a file: audio extensions are audio; anything else
    is probed: video with an audio track -> 'av', video alone -> 'video', audio alone -> 'audio'."""
    if src.modality != "auto":
        return src.modality
    if src.path is None:
        return "text"
    if os.path.splitext(src.path)[1].lower() in AUDIO_EXTS:
        return "audio"
    has_audio, has_video = probe(src.path)
    if has_video:
        return "av" if has_audio else "video"
    if has_audio:
        return "audio"
    raise MediaError(src.path, "has neither an audio nor a video stream")


def to_item(src: SourceItem, modality: str) -> Any:
    """The wave_rt item (str, Audio, Video, AudioVisual) for a source item."""
    from wave_rt.items import Audio, AudioVisual, Video

    if modality == "text":
        if src.text is not None:
            return src.text
        try:
            with open(src.path, encoding="utf-8") as f:  # type: ignore[arg-type]
                return f.read()
        except UnicodeDecodeError as exc:
            raise InputError(src.path, f"not UTF-8 text: {exc.reason}") from None
    if modality == "audio":
        return Audio(src.path)
    if modality == "video":
        return Video(src.path)
    if modality == "av":
        return AudioVisual(src.path)
    raise InputError(src.id, f"unknown modality {modality!r}")


@dataclass
class WorkItem:
    key: int
    src: SourceItem
    modality: str
    instruction: str | None  # what the item was embedded with (None: the model's default / text target)
    prepared: Any  # PreparedItem

    @property
    def num_tokens(self) -> int:
        return int(self.prepared.num_tokens)

    def row(self) -> Row:
        return Row(id=self.src.id, path=self.src.path, modality=self.modality,
                   duration=None if self.prepared.duration is None else float(self.prepared.duration),
                   text=self.src.text, instruction=self.instruction)


def error_record(src: SourceItem, stage: str, exc: BaseException, retryable: bool) -> ErrorRecord:
    message = str(exc) or type(exc).__name__
    return ErrorRecord(id=src.id, path=src.path, stage=stage, error=type(exc).__name__, message=message,
                       retryable=retryable)


_unexpected_logged = 0


def prepare_one(encoder: Any, src: SourceItem, key: int, instruction: str | None,
                probe: Callable[[str], tuple[bool, bool]] = _probe_streams) -> WorkItem | ErrorRecord:
    """Decode + preprocess one item; failures become error records (typed media/input errors are
    permanent, anything else is marked retryable so that a fixed bug or a flaky disk gets a second try)."""
    global _unexpected_logged
    stage = "decode"
    try:
        modality = resolve_modality(src, probe)
        item = to_item(src, modality)
        stage = "preprocess"
        instr = None if modality == "text" else (src.instruction if src.instruction is not None else instruction)
        prepared = encoder.prepare(item, instr)
        return WorkItem(key, src, modality, instr, prepared)
    except MediaError as exc:
        return error_record(src, "decode", exc, retryable=False)
    except InputError as exc:
        return error_record(src, stage, exc, retryable=False)
    except WaveRTError as exc:
        return error_record(src, stage, exc, retryable=False)
    except FileNotFoundError as exc:
        return error_record(src, "decode", exc, retryable=False)
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop a million-item job
        if _unexpected_logged < 3:
            _unexpected_logged += 1
            log.warning("unexpected error preparing %s (%s)", src.id, src.path, exc_info=True)
        return error_record(src, stage, exc, retryable=True)


def embed_work_items(runner: ModelRunner, items: list[WorkItem]) -> tuple[RowBlock | None, list[ErrorRecord]]:
    """One batch of work items -> (rows for the writer, error records)."""
    ok, failed = runner.run([w.prepared for w in items])
    errors = [error_record(items[i].src, "model", exc, retryable=True) for i, exc in sorted(failed.items())]
    good = [i for i in range(len(items)) if i in ok]
    if not good:
        return None, errors
    rows = [items[i].row() for i in good]
    emb = np.stack([ok[i] for i in good]).astype(np.float32, copy=False)
    tokens = sum(items[i].num_tokens for i in good)
    audio = sum(float(items[i].prepared.duration or 0.0) for i in good if items[i].modality in ("audio", "av"))
    video = sum(float(items[i].prepared.duration or 0.0) for i in good if items[i].modality in ("video", "av"))
    return RowBlock(rows, emb, tokens, audio, video), errors


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class PipelineStats:
    batches: int = 0
    oom_splits: int = 0
    interrupted: bool = False
    workers: int = 0  # Ray engine: distinct actors that returned results (0: not reported)


class LocalPipeline:
    """Runs the threads above over an iterable of pending SourceItems; the caller owns the writer."""

    def __init__(self, encoder: Any, writer: ArchiveWriter, *, instruction: str | None, max_batch_tokens: int,
                 workers: int, normalize: bool = True, model_threads: int | None = None,
                 max_pending_tokens: int | None = None, idle_flush_seconds: float = 1.0,
                 probe: Callable[[str], tuple[bool, bool]] = _probe_streams) -> None:
        self.encoder = encoder
        self.writer = writer
        self.progress = writer.progress
        self.instruction = instruction
        self.budget = int(max_batch_tokens)
        self.workers = max(1, int(workers))
        device = getattr(encoder, "device", torch.device("cpu"))
        self.cuda = torch.device(device).type == "cuda"
        self.model_threads = model_threads or (2 if self.cuda else 1)
        self.max_pending_tokens = max_pending_tokens or 4 * self.budget
        self.idle_flush_seconds = idle_flush_seconds
        self.probe = probe
        self.runner = ModelRunner(encoder, self.budget, normalize)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._work_q: queue.Queue = queue.Queue(maxsize=4 * self.workers)
        self._ready_q: queue.Queue = queue.Queue(maxsize=max(8, 4 * self.workers))
        self._batch_q: queue.Queue = queue.Queue(maxsize=self.model_threads)

    # ------------------------------------------------------------------ plumbing
    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._stop.set()

    def _put(self, q: queue.Queue, msg: object) -> bool:
        while not self._stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue, timeout: float = 0.1) -> object | None:
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                self._fail(exc)
        return run

    # ------------------------------------------------------------------ stages
    def _feed(self, pending: Iterable[SourceItem]) -> None:
        try:
            for key, src in enumerate(pending):
                if not self._put(self._work_q, (key, src)):
                    return
        finally:
            for _ in range(self.workers):
                if not self._put(self._work_q, _DONE):
                    break

    def _decode(self) -> None:
        while not self._stop.is_set():
            msg = self._get(self._work_q)
            if msg is None:
                continue
            if msg is _DONE:
                self._put(self._ready_q, _DONE)
                return
            key, src = msg  # type: ignore[misc]
            t0 = time.perf_counter()
            out = prepare_one(self.encoder, src, key, self.instruction, self.probe)
            self.progress.add_stage("prepare", time.perf_counter() - t0)
            if isinstance(out, ErrorRecord):
                self.writer.put_error(out)
            elif not self._put(self._ready_q, out):
                return

    def _batch(self) -> None:
        from wave_rt.embed.batching import BucketBatcher

        batcher = BucketBatcher(self.budget, max_pending=4096)
        waiting: dict[int, WorkItem] = {}
        pending_tokens = 0
        finished = 0
        last_item = time.monotonic()

        def emit(batches: list[list[Any]]) -> bool:
            nonlocal pending_tokens
            for keys in batches:
                group = [waiting.pop(k) for k in keys]
                pending_tokens -= sum(w.num_tokens for w in group)
                if not self._put(self._batch_q, group):
                    return False
            return True

        while not self._stop.is_set():
            msg = self._get(self._ready_q)
            if msg is None:
                # decode is the bottleneck: run what is waiting rather than leave the model idle
                if waiting and time.monotonic() - last_item > self.idle_flush_seconds and self._batch_q.empty():
                    if not emit(batcher.flush()):
                        return
                continue
            if msg is _DONE:
                finished += 1
                if finished == self.workers:
                    emit(batcher.flush())
                    break
                continue
            w: WorkItem = msg  # type: ignore[assignment]
            last_item = time.monotonic()
            waiting[w.key] = w
            pending_tokens += w.num_tokens
            if not emit(batcher.add(w.key, w.num_tokens)):
                return
            if pending_tokens > self.max_pending_tokens and not emit(batcher.flush()):
                return
        for _ in range(self.model_threads):
            if not self._put(self._batch_q, _DONE):
                break

    def _model(self) -> None:
        stream_ctx: Any = None
        if self.cuda:
            stream_ctx = torch.cuda.stream(torch.cuda.Stream(device=self.encoder.device))
            stream_ctx.__enter__()
        try:
            while not self._stop.is_set():
                msg = self._get(self._batch_q)
                if msg is None:
                    continue
                if msg is _DONE:
                    return
                t0 = time.perf_counter()
                block, errors = embed_work_items(self.runner, msg)  # type: ignore[arg-type]
                self.progress.add_stage("model", time.perf_counter() - t0)
                for rec in errors:
                    self.writer.put_error(rec)
                if block is not None:
                    self.writer.put_rows(block)
        finally:
            if stream_ctx is not None:
                stream_ctx.__exit__(None, None, None)

    # ------------------------------------------------------------------ run
    def run(self, pending: Iterable[SourceItem] | Iterator[SourceItem]) -> PipelineStats:
        """Process every pending item. KeyboardInterrupt stops the threads cleanly (what the writer holds
        is still committed by the caller's writer.close()) and is reported as interrupted."""
        threads = [threading.Thread(target=self._guard(lambda: self._feed(pending)), name="wave-rt-feed", daemon=True)]
        threads += [threading.Thread(target=self._guard(self._decode), name=f"wave-rt-decode-{i}", daemon=True)
                    for i in range(self.workers)]
        threads.append(threading.Thread(target=self._guard(self._batch), name="wave-rt-batch", daemon=True))
        model_threads = [threading.Thread(target=self._guard(self._model), name=f"wave-rt-model-{i}", daemon=True)
                         for i in range(self.model_threads)]
        threads += model_threads
        stats = PipelineStats()
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in model_threads):
                if self.writer.failure is not None:
                    self._fail(self.writer.failure)
                for t in model_threads:
                    t.join(timeout=0.1)
                self.progress.maybe_render()
        except KeyboardInterrupt:
            stats.interrupted = True
            self._stop.set()
        self._stop.set()
        for t in threads:
            t.join(timeout=30.0)
        stats.batches = self.runner.batches
        stats.oom_splits = self.runner.oom_splits
        if self._failure is not None:
            raise self._failure
        return stats
