"""Decode + CPU feature work in `spawn` worker processes, so it scales with cores instead of sharing one GIL.

    callers (decode threads, or imap) ──submit──> dispatcher thread ──per-worker task pipe───> worker process
                                      <─Future──                    <──per-worker result pipe──

Each worker holds at most WORKER_DEPTH items, in the order it runs them: the first is in progress, the next
one waits in its pipe so that the worker starts it as soon as it has sent a result, instead of idling through
the dispatcher's round trip (measured: a one-process pool spent ~14% of its time idle that way). The dispatcher
knows which item a worker is on (the first it holds): a worker that dies (SIGKILL, a decoder crash) has that
item handed to a fresh worker once, and only an item that kills two workers becomes an error record; the
crash is logged once; the items queued behind it go back to the front of the queue, in order. An item that
runs past `item_timeout` gets its worker killed and becomes a DecodeTimeoutError record. Prepared tensors come
back through torch's multiprocessing reductions, i.e. in shared memory, not copied through the pipe.

A worker is one core: torch intra-op, FFmpeg and BLAS threads are all set to one (environment variables before
any import, as the libraries size their thread pools at load time), so N processes use N cores.
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
WORKER_DEPTH = 2  # items a worker holds: the one in progress and the next (see the module docstring)
# Thread-pool sizes of the native libraries, read once when they load: a worker is one core.
_SINGLE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                       "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}
_env_lock = threading.Lock()
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


# ---------------------------------------------------------------------------------------------- results
# Tensors up to this size travel inside the result message; larger ones in shared memory. A shared tensor is
# received by connecting to the worker's resource-sharer thread for its file descriptor (an authenticated
# socket per tensor), which waits for the busy worker's GIL: ~3 ms of the dispatcher per tensor, measured,
# where copying 1 MB costs ~0.3 ms a side. Token ids and audio features (~0.5 MB per 10 s) go inline,
# video pixels (MBs, already written into shared memory by the worker) by descriptor.
INLINE_BYTES = 1 << 20


def _inline_tensor(data: bytes, dtype: Any, shape: tuple[int, ...]) -> Any:
    import torch

    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _result_bytes(msg: Any) -> bytes:
    """msg pickled for the result pipe: small CPU tensors by value, the rest by torch's shared-memory reductions."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch

    class _Pickler(ForkingPickler):
        def reducer_override(self, obj: Any) -> Any:
            if (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
                    and not obj.requires_grad and obj.numel() * obj.element_size() <= INLINE_BYTES):
                flat = obj.detach().contiguous().reshape(-1).view(torch.uint8)
                return _inline_tensor, (flat.numpy().tobytes(), obj.dtype, tuple(obj.shape))
            return NotImplemented

    buf = io.BytesIO()
    _Pickler(buf, pickle.HIGHEST_PROTOCOL).dump(msg)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- worker
def _worker_main(spec: Any, instruction: str | None, probe: Callable[[str], tuple[bool, bool]] | None,
                 tasks: Any, results: Any, slot: int, generation: int) -> None:
    import torch

    from wave_rt.archive.prepare import _probe_streams, prepare_one

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and stops workers itself
    torch.set_num_threads(1)  # one process per core: intra-op (and FFmpeg) threads would only contend
    from wave_rt.media.backends import cpu

    cpu.DECODER_THREADS = 1
    from wave_rt.media import features_video

    features_video.SHARED_OUTPUT = True  # pixels written straight into shared memory: no copy to send them
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
            results.send_bytes(_result_bytes((slot, generation, key, out)))
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
    held: collections.deque = field(default_factory=collections.deque)  # _Tasks sent, in the order it runs them
    started: float = 0.0  # when the first held item began (sent to an idle worker, or its predecessor returned)
    ready: bool = False

    @property
    def task(self) -> _Task | None:
        """The item in progress."""
        return self.held[0] if self.held else None


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
        self._close_lock = threading.Lock()
        self._reaped = False
        self._broken: PoolBrokenError | None = None
        self._start_failures = 0
        self._generation = 0
        # submit() writes a byte here so the dispatcher, waiting on the workers' result pipes, wakes at once
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers = [self._spawn(i) for i in range(processes)]
        self._thread = threading.Thread(target=self._dispatch, name="wave-rt-prepare-pool", daemon=True)
        self._thread.start()

    @property
    def processes(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    @property
    def ready(self) -> bool:
        """Whether some worker has started (imported everything and built its preparer)."""
        return any(w.ready for w in self._workers)

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
        with _env_lock:  # the child's environment is this process's at start(); restored right after
            saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
            os.environ.update(_SINGLE_THREAD_ENV)
            try:
                proc.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
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
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full (the dispatcher will wake anyway) or closed
            pass
        return fut

    def imap(self, items: Iterable[tuple[int, SourceEntry]], window: int | None = None) -> Iterator[Any]:
        """Results in input order, at most `window` items submitted ahead (default (WORKER_DEPTH + 1) x processes:
        results come back in order, so a window of WORKER_DEPTH x processes would leave a worker that finished
        early without a next item while an older item is still running elsewhere)."""
        window = window or (WORKER_DEPTH + 1) * self.processes
        ahead: collections.deque[Future] = collections.deque()
        for key, src in items:
            ahead.append(self.submit(key, src))
            if len(ahead) >= window:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def close(self) -> None:
        """Cancel what is queued, stop the workers and reap them. Safe to call again, from any thread: a later
        call returns once the first has finished."""
        with self._close_lock:
            if self._reaped:
                return
            self._close()
            self._reaped = True

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
        for t in pending:
            t.future.cancel()
        self._wake.set()
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass
        self._thread.join(timeout=30.0)
        for w in self._workers:
            if not w.ready:
                # still importing (a small job may end before any worker is up): it holds nothing, so it is
                # stopped now instead of being waited for through its start-up
                w.process.kill()
                continue
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
            for t in w.held:
                if not t.future.done():
                    t.future.cancel()
            _close(w)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

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
        # Idle workers first, then each one's next item: two items and two idle workers run in parallel.
        for depth in range(1, WORKER_DEPTH + 1):
            for w in self._workers:
                if len(w.held) >= depth or not w.ready:
                    continue
                task = None
                while task is None:
                    with self._lock:
                        if not self._pending:
                            return
                        task = self._pending.popleft()
                    if task.future.cancelled():
                        task = None
                task.attempts += 1
                if not w.held:
                    w.started = time.monotonic()
                w.held.append(task)
                try:
                    w.tasks.send((task.key, task.src))
                except (BrokenPipeError, OSError):
                    pass  # the worker just died: _check_workers hands its items on

    def _collect(self, timeout: float) -> None:
        from multiprocessing.connection import wait

        by_conn: dict[Any, _Worker | None] = {w.results: w for w in self._workers if not w.results.closed}
        by_conn[self._wake_r] = None
        for conn in wait(list(by_conn), timeout=timeout):
            w = by_conn[conn]
            if w is None:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                continue
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
                w.held.popleft().future.set_result(out)
                w.started = time.monotonic()  # the worker has already begun the next item it holds

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
                    self._requeue_behind(w)
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
            w.held.popleft()
            self._requeue_behind(w)
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

    def _requeue_behind(self, w: _Worker) -> None:
        """The items a stopped worker held behind the one in progress never started: back to the front of
        the queue in their order, their attempt not counted."""
        if w.held and w.held[0].future.done():
            w.held.popleft()
        behind = list(w.held)
        w.held.clear()
        for t in behind:
            t.attempts -= 1
        with self._lock:
            self._pending.extendleft(reversed(behind))

    def _break(self, why: str) -> None:
        """Fail every waiting item with PoolBrokenError: the job stops loudly instead of waiting forever."""
        err = PoolBrokenError(why)
        log.error("%s", why)
        with self._lock:
            self._broken = err
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
        for t in waiting + [t for w in self._workers for t in w.held]:
            if not t.future.done():
                t.future.set_exception(err)
        for w in self._workers:
            w.held.clear()

    def _replace(self, i: int) -> None:
        old = self._workers[i]
        old.held.clear()
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
