"""The local engine: decode workers -> length-bucketed batches under a token budget -> model -> writer.

On CUDA (or with several model threads):

    feeder ──work_q──> decode workers (threads: probe, decode, features, tokenize = encoder.prepare; media
                        items are handed to spawn worker processes (prepare_pool) and the thread only waits,
                        so decoding scales with cores and a stuck or crashing decoder is contained; text goes
                        in chunks of TEXT_CHUNK items, one queue hand-off per chunk, not per caption)
           ──ready_q──> batcher (Batches: similar lengths share a batch under the budget)
           ──batch_q──> model thread(s) (embed_prepared; on CUDA each thread has its own stream, so one
                        batch's host->device copy and collation overlap the other's compute)
           ──writer──>  shards + errors.jsonl (the writer's own thread)

On a CPU device the forward's OpenMP team fills the cores, and any thread that runs beside it slows it
down, so the caller's thread batches, runs the model and writes, and prepares text between forwards:

    feeder ──text_q──> caller's thread: text chunks prepared, batched, run, written in turns
           ──work_q──> decode workers (started at the first media item; as above) ──ready_q──> caller's thread

Every queue is bounded and the batcher holds at most `max_pending_tokens` tokens (on a CPU device, while the
job has seen only text, `text_pending_tokens`: see TEXT_WINDOW_BATCHES), so memory stays flat whatever the
source's length. Out-of-memory errors split the batch and lower the token cap
(raised again slowly after successes); an item that fails alone is reported, not fatal.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wave_rt.archive.journal import ErrorRecord
from wave_rt.archive.options import JobOptions
from wave_rt.archive.prepare import (  # noqa: F401 - re-exported: the item functions' old home
    PreparedEntry,
    _probe_streams,
    error_record,
    prepare_one,
    resolve_modality,
    to_item,
)
from wave_rt.archive.prepare_pool import (
    WORKER_DEPTH,
    PoolClosedError,
    PreparePool,
    ProcessorSpec,
    default_processes,
    picklable,
    preparer_spec,
)
from wave_rt.archive.sources import VIDEO_EXTS, SourceEntry
from wave_rt.archive.writer import ArchiveWriter, EmbeddedRows
from wave_rt.embed.runner import ModelRunner

log = logging.getLogger(__name__)

_DONE = object()
TEXT_CHUNK = 64  # captions per hand-off between the feeder, the decode threads and the batcher
CHUNK_SECONDS = 0.02  # ... or fewer, when preparing them takes longer than this
# Media decoded in threads until the worker processes are up (WaveProcessor only, see _bridge): the pool is
# started once the job's first media item has waited this long, so a job whose media the threads finish
# sooner never pays the pool's start-up (~3 s of a core: spawn, import torch, build the processor).
POOL_START_AFTER = 1.0
# On a CPU device a text-only stretch of a job prepares up to this many batches' worth of tokens before it runs
# them (media: max_pending_tokens, 4 batches): each switch between preparing and running costs the work after
# it its caches and the forward's OpenMP team (measured, 1024 captions, demo model, 2 cores: the job's work
# outside the forwards took 69 ms interleaved with real forwards against 58 ms with a no-op model; a window
# of 16 batches instead of 4 cut the job's lag behind its serial stages by ~6 ms of ~20). Prepared text is
# small (token ids and positions, well under 1 KB per caption), so the window costs a few MB.
TEXT_WINDOW_BATCHES = 16
# On a CPU device the rows of a run of forwards go to the writer when the run ends (or this long after its first
# forward, so that a slow model still hands rows on as it goes): building rows, handing them on and freeing the
# inputs between forwards made the forwards themselves slower (measured, same job as above: the job's lag
# behind its stages fell from ~16 to ~13 ms, median of three 20-pair runs each way). The run's inputs were
# all held when it began, so holding them to its end raises no peak.
DELIVER_AFTER_SECONDS = 1.0


def rows_of(items: list[PreparedEntry], emb: np.ndarray, good: list[int],
            failed: dict[int, BaseException]) -> tuple[EmbeddedRows | None, list[ErrorRecord]]:
    """A batch's forward (ModelRunner.run_block's result) -> (embedded rows for the writer, error records)."""
    errors = [error_record(items[i].src, "model", exc, retryable=True) for i, exc in sorted(failed.items())]
    if not good:
        return None, errors
    kept = items if len(good) == len(items) else [items[i] for i in good]
    tokens = 0
    audio = video = 0.0
    for w in kept:
        tokens += w.num_tokens
        if w.modality != "text":
            seconds = float(w.prepared.duration or 0.0)
            audio += seconds if w.modality in ("audio", "av") else 0.0
            video += seconds if w.modality in ("video", "av") else 0.0
    return EmbeddedRows([w.row() for w in kept], emb, tokens, audio, video), errors


# ---------------------------------------------------------------------------------------------- engine
class Batches:
    """The batcher's state: prepared entries wait in a BucketBatcher (similar lengths share a batch, under the
    token budget by the encoder's rule: real tokens for a packed forward, B x longest for a padded one)
    until their batch is full; past max_pending_tokens everything waiting is released."""

    def __init__(self, budget: int, packed: bool, max_pending_tokens: int) -> None:
        from wave_rt.embed.batching import BucketBatcher

        self._batcher = BucketBatcher(budget, max_pending=4096, packed=packed)
        self._waiting: dict[int, PreparedEntry] = {}
        self.pending_tokens = 0
        self.max_pending_tokens = max_pending_tokens

    def add(self, entry: PreparedEntry) -> list[list[PreparedEntry]]:
        """Queue one entry; the batches that are ready to run."""
        self._waiting[entry.key] = entry
        n = entry.num_tokens
        self.pending_tokens += n
        released = self._batcher.add(entry.key, n)
        out = self._take(released) if released else []
        if self.pending_tokens > self.max_pending_tokens:
            out += self.flush()
        return out

    def add_all(self, entries: list[PreparedEntry]) -> list[list[PreparedEntry]]:
        out: list[list[PreparedEntry]] = []
        for entry in entries:
            out += self.add(entry)
        return out

    def flush(self) -> list[list[PreparedEntry]]:
        """Everything waiting, as batches."""
        return self._take(self._batcher.flush())

    def _take(self, key_batches: list[list[Any]]) -> list[list[PreparedEntry]]:
        groups = [[self._waiting.pop(k) for k in keys] for keys in key_batches]
        self.pending_tokens -= sum(w.num_tokens for g in groups for w in g)
        return groups


class _FullBatches:
    """Batches ready to run, oldest first, and the tokens they hold (read on every turn of the inline loop)."""

    def __init__(self) -> None:
        self._groups: deque[tuple[list[PreparedEntry], int]] = deque()
        self.tokens = 0

    def extend(self, groups: list[list[PreparedEntry]]) -> None:
        for group in groups:
            n = sum(w.num_tokens for w in group)
            self._groups.append((group, n))
            self.tokens += n

    def pop(self) -> list[PreparedEntry]:
        group, n = self._groups.popleft()
        self.tokens -= n
        return group

    def __bool__(self) -> bool:
        return bool(self._groups)


_STREAMS: dict[tuple[int, int], Any] = {}
_STREAMS_LOCK = threading.Lock()


def model_stream(device: torch.device | str, index: int) -> Any:
    """The CUDA stream of model thread `index` on `device`, the same one for every job of the process. The
    caching allocator reuses a freed block only on the stream that allocated it, and torch.cuda.Stream()
    hands out the next of 32 pooled streams: fresh streams per job made each job allocate its working set
    anew (cudaMalloc, paid in the job's fixed cost) and let the reserved memory of a process that runs job
    after job grow up to one working set per stream. Jobs running at once on one device share these streams,
    which orders their forwards; their results are unaffected."""
    device = torch.device(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), index)
    with _STREAMS_LOCK:
        if key not in _STREAMS:
            _STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", key[0]))
        return _STREAMS[key]


@dataclass
class PipelineStats:
    batches: int = 0
    oom_splits: int = 0
    interrupted: bool = False
    workers: int = 0  # Ray engine: distinct actors that returned results (0: not reported)
    worker_crashes: int = 0  # decode worker processes that died holding an item (each item retried once)
    item_timeouts: int = 0  # items stopped by the per-item timeout (reported as DecodeTimeoutError)


class LocalPipeline:
    """Runs the threads above over an iterable of pending SourceEntries; the caller owns the writer.

    The job's settings come from `options` (instruction, max_batch_tokens, workers, normalize, decode,
    item_timeout); the keyword arguments are the engine's own tuning knobs, not job settings."""

    def __init__(self, encoder: Any, writer: ArchiveWriter, options: JobOptions, *,
                 model_threads: int | None = None, max_pending_tokens: int | None = None,
                 idle_flush_seconds: float = 1.0,
                 probe: Callable[[str], tuple[bool, bool]] = _probe_streams) -> None:
        if options.engine != "local":
            raise ValueError(f"LocalPipeline runs engine='local' jobs, not engine={options.engine!r}")
        self.options = options
        self.encoder = encoder
        self.writer = writer
        self.progress = writer.progress
        self.instruction = options.instruction
        self.budget = options.batch_budget(encoder)
        self.workers = options.decode_workers()
        # Threads that hand media to the worker processes only wait, one item each: WORKER_DEPTH of them per
        # process keep every process holding its next item (one per process would leave it idle between
        # items). In "threads" mode the threads do the work: one per worker.
        self.decode_threads = self.workers * (1 if options.decode == "threads" else WORKER_DEPTH)
        device = getattr(encoder, "device", torch.device("cpu"))
        self.cuda = torch.device(device).type == "cuda"
        self.model_threads = model_threads or (2 if self.cuda else 1)
        # On a CPU device the forwards run on the caller's thread (see run) and so does text: tokenizing
        # a caption in a thread beside a forward whose OpenMP team fills the cores slowed the forwards by
        # ~15% (measured: 1024 captions, demo model, 2 cores), more than the tokenizing itself costs, so
        # there text is prepared between forwards instead of beside them. Media still decode in parallel.
        self.inline = not self.cuda and self.model_threads == 1
        self._text_q: queue.Queue = queue.Queue(maxsize=16)  # chunks the feeder parses ahead
        self._decoders: list[threading.Thread] = []
        self._decoders_finished = 0
        self.max_pending_tokens = max_pending_tokens or 4 * self.budget
        # the inline loop's bound while no media item has come (see TEXT_WINDOW_BATCHES); a bound the caller
        # sets holds for text too
        self.text_pending_tokens = max_pending_tokens or TEXT_WINDOW_BATCHES * self.budget
        self.idle_flush_seconds = idle_flush_seconds
        self.probe = probe
        self.decode = options.decode
        self.item_timeout = options.item_timeout
        self.pool: PreparePool | None = None
        self._pool_lock = threading.Lock()
        self._pool_spec: Any = None
        self._bridge = False  # media go to bounded threads while no worker process is up (see _media_pool)
        self._first_media: float | None = None
        self.bridged = 0  # media items prepared in threads while the pool started
        self.bridge_timeouts = 0
        self._gpu_video: bool | None = None
        # A batch goes to an idle model thread early once it holds this many tokens (see _batch).
        self.early_batch_tokens = max(1, self.budget // 8)
        self._busy_models = 0
        self._busy_lock = threading.Lock()
        self.runner = ModelRunner(encoder, self.budget, options.normalize)
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

    def _in_process(self, src: SourceEntry) -> bool:
        """Text is tokenized here (cheaper than a hop to a process). With DALI and a GPU, video files are
        decoded here too: DALI's NVDEC pipelines belong to the process that owns the GPU, run off the GIL, and
        hand the frames to GPU features; codecs DALI lacks fall back to PyAV inside the same call."""
        if src.path is None or src.modality == "text":
            return True
        if self._gpu_video is None:
            from wave_rt.media.backends import resolve_backend

            self._gpu_video = self.cuda and resolve_backend("auto") == "dali"
        return self._gpu_video and os.path.splitext(src.path)[1].lower() in VIDEO_EXTS

    def _model_idle(self) -> bool:
        with self._busy_lock:
            return self._batch_q.empty() and self._busy_models < self.model_threads

    def _media_pool(self) -> PreparePool | None:
        """The worker processes that decode media, started for the first media item (a text-only job never
        pays their start-up), or POOL_START_AFTER seconds later where media can be bridged in threads;
        None where decoding stays in threads, or while the start is deferred."""
        if self.decode == "threads":
            return None
        with self._pool_lock:
            if self.pool is None and self._pool_spec is None:
                probe = None if self.probe is _probe_streams else self.probe
                self._pool_spec = (preparer_spec(self.encoder) if picklable(probe) else None) or False
                if self._pool_spec is False:
                    if self.decode == "processes":
                        raise ValueError("decode='processes' needs an encoder that can be sent to worker processes")
                    log.info("the encoder cannot be sent to worker processes: media is decoded in threads")
                # Only wave_rt's own processor is run in threads before the workers are up: its decoders bound
                # their work by the declared duration and frame rate and by a wall-clock budget, and an item
                # that still overruns the per-item timeout is abandoned (see _prepare_bounded). Other encoders'
                # prepare may block or kill its process: it only ever runs in a worker.
                self._bridge = self.decode == "auto" and isinstance(self._pool_spec, ProcessorSpec)
                self._first_media = time.monotonic()
            if self.pool is None and self._pool_spec is not False and (
                    not self._bridge or time.monotonic() - (self._first_media or 0.0) >= POOL_START_AFTER):
                self.pool = PreparePool(self._pool_spec, self.instruction, default_processes(self.workers),
                                        item_timeout=self.item_timeout,
                                        probe=None if self.probe is _probe_streams else self.probe)
            return self.pool

    def _prepare_media(self, key: int, src: SourceEntry) -> Any:
        """A media item's PreparedEntry or ErrorRecord; None when the job is stopping."""
        pool = self._media_pool()
        if pool is not None and (pool.ready or not self._bridge):
            try:
                return pool.submit(key, src).result()  # this thread only waits: the work runs in a process
            except (CancelledError, PoolClosedError):  # the pool was closed: the job is stopping
                return None
        if self._bridge:
            return self._prepare_bounded(key, src)
        return prepare_one(self.encoder, src, key, self.instruction, self.probe)

    def _prepare_bounded(self, key: int, src: SourceEntry) -> Any:
        """prepare_one in a thread of its own, waited for at most item_timeout: an item past it becomes a
        DecodeTimeoutError record and its thread is abandoned (a thread cannot be stopped; the decoder's own
        wall-clock budget, MediaLimits.max_decode_seconds, ends it later)."""
        from wave_rt.media.errors import DecodeTimeoutError

        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(prepare_one(self.encoder, src, key, self.instruction, self.probe))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting decode thread
                fut.set_exception(exc)

        threading.Thread(target=run, name="wave-rt-prepare-bridge", daemon=True).start()
        deadline = None if self.item_timeout is None else time.monotonic() + self.item_timeout
        while not self._stop.is_set():
            wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            try:
                out = fut.result(timeout=max(0.0, wait))
            except FutureTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    self.bridge_timeouts += 1
                    exc = DecodeTimeoutError(src.path or src.id,
                                             f"preparing the item took longer than the per-item timeout of "
                                             f"{self.item_timeout:g} s; it was abandoned")
                    return error_record(src, "decode", exc, retryable=False)
                continue
            self.bridged += 1
            return out
        return None

    # ------------------------------------------------------------------ stages
    def _feed(self, pending: Iterable[SourceEntry]) -> None:
        """Lists of (key, item) into work_q: consecutive text items TEXT_CHUNK at a time, media one by one."""
        try:
            it = enumerate(pending)
            chunk: list[tuple[int, SourceEntry]] = []
            while True:
                media = None
                for key, src in it:
                    if src.path is None or src.modality == "text":
                        chunk.append((key, src))
                        if len(chunk) >= TEXT_CHUNK:
                            break
                    else:
                        media = (key, src)
                        break
                else:
                    it = None
                if chunk and (media is not None or len(chunk) >= TEXT_CHUNK or it is None):
                    if not self._put(self._text_q if self.inline else self._work_q, chunk):
                        return
                    chunk = []
                if media is not None:
                    self._start_decoders()
                    if not self._put(self._work_q, [media]):
                        return
                if it is None:
                    return
        finally:
            for _ in range(len(self._decoders)):
                if not self._put(self._work_q, _DONE):
                    break
            if self.inline:
                self._put(self._text_q, _DONE)  # after the decoders' _DONE: their number is final by then

    def _start_decoders(self) -> None:
        """The decode threads, started once (from run, or in a CPU job from the feeder at its first media
        item: a text-only CPU job prepares everything on the caller's thread and never needs them)."""
        if self._decoders:
            return
        self._decoders = [threading.Thread(target=self._guard(self._decode), name=f"wave-rt-decode-{i}", daemon=True)
                          for i in range(self.decode_threads)]
        for t in self._decoders:
            t.start()

    def _decode(self) -> None:
        while not self._stop.is_set():
            msg = self._get(self._work_q)
            if msg is None:
                continue
            if msg is _DONE:
                self._put(self._ready_q, _DONE)
                self._decoder_done()
                return
            if len(msg) > 1 or self._in_process(msg[0][1]):  # type: ignore[arg-type, index]
                if not self._prepare_in_process(msg, self._put_ready):  # type: ignore[arg-type]
                    return
                continue
            t0 = time.perf_counter()
            key, src = msg[0]  # type: ignore[index]
            out = self._prepare_media(key, src)
            if out is None:
                return
            self.progress.add_stage("prepare", time.perf_counter() - t0)
            if isinstance(out, ErrorRecord):
                self.writer.put_error(out)
            elif not self._put(self._ready_q, [out]):
                return

    def _decoder_done(self) -> None:
        """The last decode thread to finish closes the worker processes: no media item is left to decode, and
        their shutdown (each process exits its interpreter, ~0.1-1 s) then overlaps the model's last forwards
        instead of adding to the job's tail (run() closes the pool again, which waits for this close)."""
        with self._pool_lock:
            self._decoders_finished += 1
            last = self._decoders_finished == len(self._decoders)
            pool = self.pool
        if last and pool is not None:
            pool.close()

    def _put_ready(self, entries: list[PreparedEntry]) -> bool:
        return self._put(self._ready_q, entries)

    def _prepare_in_process(self, items: list[tuple[int, SourceEntry]],
                            hand_on: Callable[[list[PreparedEntry]], bool]) -> bool:
        """Text (and DALI video) prepared in this process, handed on after every CHUNK_SECONDS of work so
        that slow items still reach the batcher early; False when the job is stopping."""
        pos = 0
        while pos < len(items):
            good: list[PreparedEntry] = []
            t0 = time.perf_counter()
            while pos < len(items) and (not good or time.perf_counter() - t0 < CHUNK_SECONDS):
                key, src = items[pos]
                pos += 1
                out = prepare_one(self.encoder, src, key, self.instruction, self.probe)
                if isinstance(out, ErrorRecord):
                    self.writer.put_error(out)
                else:
                    good.append(out)
            self.progress.add_stage("prepare", time.perf_counter() - t0)
            if good and not hand_on(good):
                return False
        return True

    def _batch(self) -> None:
        """The batcher thread (CUDA, or several model threads): ready_q -> Batches -> batch_q."""
        batches = Batches(self.budget, bool(getattr(self.encoder, "packed", False)), self.max_pending_tokens)
        finished = 0
        last_item = time.monotonic()

        def emit(out: list[list[PreparedEntry]]) -> bool:
            return all(self._put(self._batch_q, group) for group in out)

        while not self._stop.is_set():
            msg = self._get(self._ready_q)
            if msg is None:
                # decode is the bottleneck: run what is waiting rather than leave the model idle
                if batches.pending_tokens and time.monotonic() - last_item > self.idle_flush_seconds \
                        and self._batch_q.empty() and not emit(batches.flush()):
                    return
                continue
            if msg is _DONE:
                finished += 1
                if finished == self.decode_threads:
                    emit(batches.flush())
                    break
                continue
            last_item = time.monotonic()
            for w in msg:  # type: ignore[union-attr]
                if not emit(batches.add(w)):
                    return
                # Work-conserving: a model thread with nothing to do gets what is waiting once it is worth a
                # forward, instead of idling until a bucket fills (a job smaller than one budget, e.g. 512
                # captions under 32k tokens, would otherwise prepare every item before the first forward).
                if batches.pending_tokens >= self.early_batch_tokens and self._model_idle() \
                        and not emit(batches.flush()):
                    return
        for _ in range(self.model_threads):
            if not self._put(self._batch_q, _DONE):
                break

    def _model(self, index: int = 0) -> None:
        """A model thread (CUDA): batch_q -> forward -> writer."""
        stream_ctx: Any = None
        if self.cuda:
            stream_ctx = torch.cuda.stream(model_stream(self.encoder.device, index))
            stream_ctx.__enter__()
        try:
            while not self._stop.is_set():
                msg = self._get(self._batch_q)
                if msg is None:
                    continue
                if msg is _DONE:
                    return
                self._forward(msg)  # type: ignore[arg-type]
        finally:
            if stream_ctx is not None:
                stream_ctx.__exit__(None, None, None)

    def _forward(self, batch: list[PreparedEntry]) -> None:
        """One batch through the model, its rows and errors to the writer."""
        self._deliver(batch, self._run_batch(batch))

    def _run_batch(self, batch: list[PreparedEntry]) -> tuple[np.ndarray, list[int], dict[int, BaseException]]:
        with self._busy_lock:
            self._busy_models += 1
        t0 = self.progress.forward_started()
        try:
            return self.runner.run_block([w.prepared for w in batch])
        finally:
            with self._busy_lock:
                self._busy_models -= 1
            self.progress.forward_ended(t0)

    def _deliver(self, batch: list[PreparedEntry], result: tuple[np.ndarray, list[int], dict[int, BaseException]]) -> None:
        block, errors = rows_of(batch, *result)
        for rec in errors:
            self.writer.put_error(rec)
        if block is not None:
            self.writer.put_rows(block)

    def _batch_and_model_inline(self, tick: Callable[[], None]) -> None:
        """Batcher and model on the caller's thread (a CPU device), so that tokenizing never runs beside a
        forward. Each turn it either prepares (batches the media items the decode threads have ready, else
        prepares a chunk of text here) or runs full batches. It prepares while input is at hand and less
        than max_pending_tokens is waiting (text_pending_tokens while the job has seen only text), then runs
        every full batch: switching between the two costs the work after it its caches and the forward's
        OpenMP team, so it switches every few batches, not every batch. The writer has no thread here (the
        pipeline does not start it): its work runs on this thread too, as the rows of each run of batches are
        handed to it (DELIVER_AFTER_SECONDS); a failure still hands on what was computed. With nothing at
        hand, what is waiting runs once it is worth a forward (or has waited idle_flush_seconds), else it
        waits briefly for either queue. `tick` on every turn."""
        ran: list[tuple[list[PreparedEntry], Any]] = []  # forwards of this run of batches, not yet delivered
        try:
            self._inline_turns(tick, ran)
        except BaseException:
            try:
                self._deliver_all(ran)  # what was computed is kept
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                log.exception("could not hand the last batches to the writer")
            raise
        self._deliver_all(ran)

    def _deliver_all(self, ran: list[tuple[list[PreparedEntry], Any]]) -> None:
        for batch, result in ran:
            self._deliver(batch, result)
        ran.clear()

    def _inline_turns(self, tick: Callable[[], None], ran: list[tuple[list[PreparedEntry], Any]]) -> None:
        batches = Batches(self.budget, bool(getattr(self.encoder, "packed", False)), self.max_pending_tokens)
        full = _FullBatches()
        running = False  # running full batches until none is left
        ran_since = 0.0
        decoders_done = 0
        text_done = False
        last_item = time.monotonic()

        def batch(entries: list[PreparedEntry]) -> bool:
            full.extend(batches.add_all(entries))
            return True

        while not self._stop.is_set():
            tick()
            # text only so far: the longer window (fewer switches); from the first media item, the usual bound
            limit = batches.max_pending_tokens = self.max_pending_tokens if self._decoders else self.text_pending_tokens
            if full and not running:
                at_hand = not self._ready_q.empty() or (not text_done and not self._text_q.empty())
                held = batches.pending_tokens + full.tokens
                running = not at_hand or held >= limit
            if running:
                group = full.pop()
                running = bool(full)
                if not ran:
                    ran_since = time.monotonic()
                ran.append((group, self._run_batch(group)))
                if not running or time.monotonic() - ran_since >= DELIVER_AFTER_SECONDS:
                    self._deliver_all(ran)
                continue
            try:
                msg = self._ready_q.get_nowait()
            except queue.Empty:
                msg = None
            if msg is None and not text_done:
                chunk = self._text_q_nowait()
                if chunk is None and not batches.pending_tokens and not full:
                    chunk = self._get(self._text_q, timeout=0.005)  # nothing to run: wait a little for text
                if chunk is _DONE:
                    text_done = True
                    continue
                if chunk is not None:
                    last_item = time.monotonic()
                    if not self._prepare_in_process(chunk, batch):  # type: ignore[arg-type]
                        return
                    continue
            if msg is None:
                if full:
                    continue  # nothing at hand after all: the next turn runs them
                if text_done and decoders_done == len(self._decoders):
                    full.extend(batches.flush())
                    if not full:
                        return
                elif batches.pending_tokens >= self.early_batch_tokens or (
                        batches.pending_tokens and time.monotonic() - last_item > self.idle_flush_seconds):
                    full.extend(batches.flush())  # work-conserving, as in _batch
                elif text_done:
                    msg = self._get(self._ready_q, timeout=0.005)
                elif batches.pending_tokens:
                    time.sleep(0.001)  # a few items wait for more: let the feeder and decode threads run
                if msg is None:
                    continue
            if msg is _DONE:
                decoders_done += 1
                continue
            last_item = time.monotonic()
            batch(msg)  # type: ignore[arg-type]

    def _text_q_nowait(self) -> Any:
        try:
            return self._text_q.get_nowait()
        except queue.Empty:
            return None

    def _upkeep(self) -> None:
        """The job's own duties while the model runs: stop on a writer failure, draw the progress line."""
        if self.writer.failure is not None:
            self._fail(self.writer.failure)
            return
        self.writer.upkeep()
        self.progress.maybe_render()

    # ------------------------------------------------------------------ run
    def run(self, pending: Iterable[SourceEntry] | Iterator[SourceEntry]) -> PipelineStats:
        """Process every pending item. KeyboardInterrupt stops the threads cleanly (what the writer holds
        is still committed by the caller's writer.close()) and is reported as interrupted."""
        if not self.inline:
            self.writer.start()  # on a CPU device the caller's thread writes too (see ArchiveWriter.start)
            self._start_decoders()
        threads = [threading.Thread(target=self._guard(lambda: self._feed(pending)), name="wave-rt-feed", daemon=True)]
        # On a CPU device batching and the forwards run on this thread, the one that loaded the model: OpenMP
        # (libgomp) gives each thread that starts parallel regions a team of its own, and once two teams
        # exceed the cores it stops spin-waiting between regions, which made the demo model's many small
        # parallel regions 1.7x slower in a model thread than on the main thread (measured, interleaved runs;
        # no difference with one intra-op thread, or with every forward on one thread).
        inline = self.inline
        model_threads = [] if inline else [
            threading.Thread(target=self._guard(lambda i=i: self._model(i)), name=f"wave-rt-model-{i}", daemon=True)
            for i in range(self.model_threads)]
        if not inline:
            threads.append(threading.Thread(target=self._guard(self._batch), name="wave-rt-batch", daemon=True))
        threads += model_threads
        stats = PipelineStats()
        for t in threads:
            t.start()
        try:
            if inline:
                try:
                    self._batch_and_model_inline(tick=self._upkeep)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the threads stop
                    self._fail(exc)
            while any(t.is_alive() for t in model_threads):
                self._upkeep()
                for t in model_threads:
                    t.join(timeout=0.1)
        except KeyboardInterrupt:
            stats.interrupted = True
            self._stop.set()
        self._stop.set()
        if self.pool is not None:
            self.pool.close()  # wakes decode threads waiting on a result (their futures are cancelled)
        for t in threads + self._decoders:  # the feeder first: it may start the decoders until it ends
            t.join(timeout=30.0)
        if self.pool is not None:
            stats.worker_crashes, stats.item_timeouts = self.pool.stats.crashes, self.pool.stats.timeouts
        stats.item_timeouts += self.bridge_timeouts
        if self.bridged:
            log.info("%d media items were prepared in threads while the worker processes started", self.bridged)
        stats.batches = self.runner.batches
        stats.oom_splits = self.runner.oom_splits
        if self._failure is not None:
            raise self._failure
        return stats
