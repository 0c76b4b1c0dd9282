"""Decode + CPU feature work in `spawn` worker processes, so it scales with cores instead of sharing one GIL.

    callers (decode threads, or imap) ──submit──> dispatcher thread ──per-worker task pipe───> worker process
                                      <─Future──                    <──per-worker result pipe──

Each worker holds at most one item, so the dispatcher always knows which item a worker has: a worker that
dies (SIGKILL, a decoder crash) has its item handed to a fresh worker once, and only an item that kills two
workers becomes an error record; the crash is logged once. An item that runs past `item_timeout` gets its
worker killed and becomes a DecodeTimeoutError record. Prepared tensors come back through torch's
multiprocessing reductions, i.e. in shared memory, not copied through the pipe.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from wave_rt.archive.errors import DecodeWorkerCrashError
from wave_rt.archive.journal import ErrorRecord
from wave_rt.archive.options import DEFAULT_ITEM_TIMEOUT
from wave_rt.archive.sources import SourceEntry
from wave_rt.media.errors import DecodeTimeoutError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # an item is given to a second worker after the first one died holding it
_READY = "ready"  # a worker's first message: it has imported everything and built its preparer


MAX_START_FAILURES = 3  # workers in a row that die before they are ready: the pool is broken, not one item


class PoolClosedError(RuntimeError):
    """submit() after close(): the job is stopping."""


class PoolBrokenError(RuntimeError):
    """Worker processes die before they can take an item (a bad install, an encoder that cannot be rebuilt)."""


# ---------------------------------------------------------------------------------------------- preparer
@dataclass(frozen=True)
class ProcessorSpec:
    """What a worker needs to rebuild a WaveProcessor (the processor itself holds a lock: not picklable)."""

    config: Any
    tokenizer: Any
    defer_features: bool = False  # the encoder's: items carry raw samples/frames, featurized in the model stage

    def build(self) -> Any:
        from wave_rt.embed.processor import WaveProcessor

        # Worker processes decode on the CPU: GPU decoding (DALI) stays in the parent, which owns the device.
        return WaveProcessor(self.config, self.tokenizer, media_backend="cpu", defer_features=self.defer_features)


def preparer_spec(encoder: Any) -> Any | None:
    """A picklable object whose `.build()` (or itself, when it has `.prepare`) prepares items in a worker;
    None when the encoder cannot be sent to another process (the pipeline then prepares in threads)."""
    processor = getattr(encoder, "processor", None)
    if processor is not None and type(processor).__name__ == "WaveProcessor":
        spec: Any = ProcessorSpec(processor.config, processor.tokenizer, bool(getattr(encoder, "defer_features", False)))
    else:
        spec = encoder
    return spec if picklable(spec) else None


def picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - anything unpicklable (locks, CUDA modules, lambdas) means threads
        return False
    return True


# ---------------------------------------------------------------------------------------------- worker
def _worker_main(spec: Any, instruction: str | None, probe: Callable[[str], tuple[bool, bool]] | None,
                 tasks: Any, results: Any, slot: int, generation: int) -> None:
    import torch

    from wave_rt.archive.prepare import _probe_streams, prepare_one

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and stops workers itself
    torch.set_num_threads(1)  # one process per core: intra-op (and FFmpeg) threads would only contend
    from wave_rt.media.backends import cpu

    cpu.DECODER_THREADS = 1
    preparer = spec.build() if hasattr(spec, "build") else spec
    results.send((slot, generation, _READY, None))  # items are timed from here: start-up is not the item's
    while True:
        try:
            msg = tasks.recv()
        except (EOFError, OSError):  # the parent is gone (killed, or closed the pool): an orphan must not stay
            return
        if msg is None:
            return
        key, src = msg
        out = prepare_one(preparer, src, key, instruction, probe or _probe_streams)
        try:
            results.send((slot, generation, key, out))
        except (BrokenPipeError, OSError):
            return


# ---------------------------------------------------------------------------------------------- pool
@dataclass
class _Task:
    key: int
    src: SourceEntry
    future: Future
    attempts: int = 0


@dataclass
class _Worker:
    slot: int
    generation: int
    process: Any
    tasks: Any  # the parent's sending end of this worker's task pipe
    results: Any  # the parent's receiving end of this worker's result pipe
    task: _Task | None = None
    started: float = 0.0
    ready: bool = False


@dataclass
class PoolStats:
    crashes: int = 0  # workers that died holding an item
    timeouts: int = 0  # items that ran past item_timeout
    restarts: int = 0
    crashed_ids: list[str] = field(default_factory=list)


class PreparePool:
    """`processes` spawn workers running pipeline.prepare_one; submit() returns a Future of a PreparedEntry or an
    ErrorRecord, imap() yields them in input order."""

    def __init__(self, spec: Any, instruction: str | None, processes: int, *,
                 item_timeout: float | None = DEFAULT_ITEM_TIMEOUT,
                 probe: Callable[[str], tuple[bool, bool]] | None = None) -> None:
        import torch.multiprocessing as tmp

        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if item_timeout is not None and not item_timeout > 0:
            raise ValueError(f"item_timeout must be positive or None, got {item_timeout!r}")
        self._ctx = tmp.get_context("spawn")
        self.spec = spec
        self.instruction = instruction
        self.probe = probe
        self.item_timeout = item_timeout
        self.stats = PoolStats()
        self._pending: collections.deque[_Task] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._broken: PoolBrokenError | None = None
        self._start_failures = 0
        self._generation = 0
        self._workers = [self._spawn(i) for i in range(processes)]
        self._thread = threading.Thread(target=self._dispatch, name="wave-rt-prepare-pool", daemon=True)
        self._thread.start()

    @property
    def processes(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _spawn(self, slot: int) -> _Worker:
        self._generation += 1
        # One-way pipes per worker, each with a single writer: a worker SIGKILLed halfway through a write
        # breaks only its own pipe (a shared multiprocessing.Queue would keep its lock held for good and
        # stall every other worker), and each side sees EOF when the other dies.
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_worker_main, name=f"wave-rt-prepare-{slot}", daemon=True,
            args=(self.spec, self.instruction, self.probe, task_r, result_w, slot, self._generation))
        proc.start()
        task_r.close()  # the worker's ends: closed here so that EOF reaches whoever survives
        result_w.close()
        return _Worker(slot, self._generation, proc, task_w, result_r)

    # ------------------------------------------------------------------ API
    def submit(self, key: int, src: SourceEntry) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise PoolClosedError("the prepare pool is closed")
            self._pending.append(_Task(key, src, fut))
        self._wake.set()
        return fut

    def imap(self, items: Iterable[tuple[int, SourceEntry]], window: int | None = None) -> Iterator[Any]:
        """Results in input order, at most `window` (default 2 x processes) items submitted ahead."""
        window = window or 2 * self.processes
        ahead: collections.deque[Future] = collections.deque()
        for key, src in items:
            ahead.append(self.submit(key, src))
            if len(ahead) >= window:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
        for t in pending:
            t.future.cancel()
        self._wake.set()
        self._thread.join(timeout=30.0)
        for w in self._workers:
            try:
                w.tasks.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5.0
        for w in self._workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5.0)
            if w.task is not None and not w.task.future.done():
                w.task.future.cancel()
            _close(w)

    def __enter__(self) -> PreparePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ dispatcher
    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            self._assign()
            self._collect(timeout=0.05)
            self._check_workers()

    def _assign(self) -> None:
        for w in self._workers:
            if w.task is not None or not w.ready:
                continue
            with self._lock:
                if not self._pending:
                    return
                task = self._pending.popleft()
            if task.future.cancelled():
                continue
            task.attempts += 1
            w.task, w.started = task, time.monotonic()
            try:
                w.tasks.send((task.key, task.src))
            except (BrokenPipeError, OSError):
                pass  # the worker just died: _check_workers hands the item on

    def _collect(self, timeout: float) -> None:
        from multiprocessing.connection import wait

        by_conn = {w.results: w for w in self._workers if not w.results.closed}
        for conn in wait(list(by_conn), timeout=timeout):
            w = by_conn[conn]
            try:
                msg = conn.recv()
            except Exception:  # noqa: BLE001 - EOF (the worker died), or a result whose sender died before its
                continue  # shared memory was fetched: _check_workers sees the death and hands the item on
            slot, generation, key, out = msg
            if generation != w.generation:
                continue
            if isinstance(key, str) and key == _READY:
                w.ready = True
                self._start_failures = 0
            elif w.task is not None and w.task.key == key:
                w.task.future.set_result(out)
                w.task = None

    def _check_workers(self) -> None:
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.process.is_alive():
                if (w.task is not None and self.item_timeout is not None
                        and now - w.started > self.item_timeout):
                    task = w.task
                    w.process.kill()
                    w.process.join(timeout=5.0)
                    self.stats.timeouts += 1
                    exc = DecodeTimeoutError(task.src.path or task.src.id,
                                             f"preparing the item took longer than the per-item timeout "
                                             f"of {self.item_timeout:g} s; its worker was stopped")
                    task.future.set_result(_record(task.src, exc, retryable=False))
                    self._replace(i)
                continue
            task = w.task
            code = w.process.exitcode
            if task is not None:
                self._collect(timeout=0.0)  # its result may have arrived just before it died
                task = w.task
            if task is None:
                if not w.ready:
                    self._start_failures += 1
                    if self._start_failures >= MAX_START_FAILURES:
                        self._break(f"{self._start_failures} decode worker processes in a row exited (code {code}) "
                                    "before they could take an item")
                        return
                if code is not None and code != 0:
                    log.warning("prepare worker %d exited with code %s while idle; restarted", w.slot, code)
                self._replace(i)
                continue
            self.stats.crashes += 1
            self.stats.crashed_ids.append(task.src.id)
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if task.attempts < MAX_ATTEMPTS:
                log.warning("prepare worker %d died (%s) while preparing %s; the item goes to a new worker",
                            w.slot, how, task.src.id)
                with self._lock:
                    self._pending.appendleft(task)
            else:
                log.warning("prepare worker %d died (%s) on %s, the second worker to die on it; item reported",
                            w.slot, how, task.src.id)
                exc = DecodeWorkerCrashError(task.src.path or task.src.id, how, task.attempts)
                task.future.set_result(_record(task.src, exc, retryable=True))
            self._replace(i)

    def _break(self, why: str) -> None:
        """Fail every waiting item with PoolBrokenError: the job stops loudly instead of waiting forever."""
        err = PoolBrokenError(why)
        log.error("%s", why)
        with self._lock:
            self._broken = err
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
        for t in waiting + [w.task for w in self._workers if w.task is not None]:
            if not t.future.done():
                t.future.set_exception(err)
        for w in self._workers:
            w.task = None

    def _replace(self, i: int) -> None:
        old = self._workers[i]
        old.task = None
        _close(old)
        with self._lock:
            if self._closed:
                return
        self.stats.restarts += 1
        self._workers[i] = self._spawn(old.slot)


def _close(w: _Worker) -> None:
    for conn in (w.tasks, w.results):
        try:
            conn.close()
        except OSError:
            pass


def _record(src: SourceEntry, exc: BaseException, retryable: bool) -> ErrorRecord:
    from wave_rt.archive.prepare import error_record

    return error_record(src, "decode", exc, retryable=retryable)


def default_processes(workers: int) -> int:
    """Worker processes for `workers` requested decode workers: never more than the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(int(workers), cores))
