"""The writer: the only code that touches the output directory while a job runs, on a thread of its own
(after start()) or, on a CPU device's local engine, on the threads that hand it work, one at a time.

It buffers embedded rows and commits them as a shard when the buffer holds `shard_rows` rows or
`commit_seconds` have passed since the last commit (so a kill loses at most that much work), and
appends error records as they come. Both engines (local, Ray) feed it, so they write the same format
with the same resume semantics.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wave_rt.archive.journal import ErrorLog, ErrorRecord, Journal
from wave_rt.archive.progress import Progress
from wave_rt.archive.shards import ShardBuffer, ShardRow, shard_name, unrecordable_field, write_shard

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class EmbeddedRows:
    """One batch's result for the writer: shard rows, their vectors, and the progress accounting."""

    rows: list[ShardRow]
    embeddings: np.ndarray  # float32 [len(rows), dim]
    tokens: int
    audio_seconds: float
    video_seconds: float


class WriterFailed(RuntimeError):
    pass


class ArchiveWriter:
    def __init__(self, out_dir: str | Path, journal: Journal, errors: ErrorLog, dim: int, embedding_dtype: str,
                 shard_rows: int, commit_seconds: float, progress: Progress, max_messages: int = 64) -> None:
        if shard_rows <= 0:
            raise ValueError("shard_rows must be positive")
        self.out_dir = Path(out_dir)
        self.journal = journal
        self.errors = errors
        self.dim = dim
        self.embedding_dtype = embedding_dtype
        self.shard_rows = shard_rows
        self.commit_seconds = commit_seconds
        self.progress = progress
        self.buffer = ShardBuffer(dim)
        self.rows_written = 0
        self.errors_written = 0
        self.shards_written = 0
        self._q: queue.Queue = queue.Queue(maxsize=max_messages)
        self._thread = threading.Thread(target=self._loop, name="wave-rt-writer", daemon=True)
        self._threaded = False  # until start(): each put is handled on the caller's thread, under _lock
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._last_commit = time.monotonic()
        self._next = journal.next_number()

    # ------------------------------------------------------------------ producer side (any thread)
    def start(self) -> ArchiveWriter:
        """Hand the work to the writer thread from now on. Without it, every put is handled on the thread that
        makes it: the local engine on a CPU device does so, where a writer thread woken beside the forwards
        took a core from their OpenMP team."""
        self._threaded = True
        self._thread.start()
        return self

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise WriterFailed(f"the archive writer stopped: {self._failure}") from self._failure

    def _put(self, msg: object) -> None:
        if not self._threaded:
            with self._lock:
                self._raise_if_failed()
                try:
                    self._handle(msg)
                except BaseException as exc:
                    self._failure = exc
                    log.error("archive writer failed: %s", exc)
                    self._raise_if_failed()
            return
        while True:
            self._raise_if_failed()
            try:
                self._q.put(msg, timeout=0.2)
                return
            except queue.Full:
                continue

    def put_rows(self, block: EmbeddedRows) -> None:
        self._put(block)

    def put_error(self, rec: ErrorRecord) -> None:
        self._put(rec)

    def upkeep(self) -> None:
        """Without the writer thread: commit what is buffered once commit_seconds have passed (the thread does
        this on its own every 0.2 s)."""
        if not self._threaded and self._failure is None and len(self.buffer) \
                and time.monotonic() - self._last_commit >= self.commit_seconds:
            self._put(None)

    def close(self) -> None:
        """Commit what is buffered and stop; re-raises a failure of the writer thread."""
        if self._thread.is_alive():
            try:
                self._put(_STOP)
            except WriterFailed:
                pass
            self._thread.join()
        if self._failure is None:
            # The last commit runs on the caller's thread, with or without the writer thread: on a CPU device
            # that thread ran the forwards, whose OpenMP team spins on the cores for a while after the last
            # one, and the same commit on another thread took ~8x longer then (40 vs 5 ms for 1024 rows).
            try:
                self._commit_all()
            except BaseException as exc:  # noqa: BLE001 - re-raised below as WriterFailed, like the thread's
                self._failure = exc
                log.error("archive writer failed: %s", exc)
        self.journal.close()
        self.errors.close()
        self._raise_if_failed()

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    # ------------------------------------------------------------------ writer thread
    def _loop(self) -> None:
        try:
            while True:
                try:
                    msg = self._q.get(timeout=0.2)
                except queue.Empty:
                    msg = None
                if msg is _STOP:
                    return  # close() commits what is left
                self._handle(msg)
        except BaseException as exc:  # noqa: BLE001 - handed to the producers, which re-raise it
            self._failure = exc
            log.error("archive writer failed: %s", exc)

    def _handle(self, msg: object) -> None:
        """One message (None: only the time check), then the commits that are due."""
        if isinstance(msg, EmbeddedRows):
            rows, embeddings = self._recordable_rows(msg)
            self.buffer.add(rows, embeddings)
            self.progress.add(done=len(rows), tokens=msg.tokens, audio_seconds=msg.audio_seconds,
                              video_seconds=msg.video_seconds)
        elif isinstance(msg, ErrorRecord):
            self._append_error(msg)
        while len(self.buffer) >= self.shard_rows:
            self._commit(self.shard_rows)
        if len(self.buffer) and time.monotonic() - self._last_commit >= self.commit_seconds:
            self._commit(len(self.buffer))
        self.progress.maybe_render()

    def _append_error(self, rec: ErrorRecord) -> None:
        t0 = time.perf_counter()
        self.errors.append(rec)
        self.errors_written += 1
        self.progress.add(failed=1)
        self.progress.add_stage("write", time.perf_counter() - t0)

    def _recordable_rows(self, msg: EmbeddedRows) -> tuple[list[ShardRow], np.ndarray]:
        """The rows a UTF-8 Parquet shard can hold; each other one becomes its item's error record. pyarrow
        refuses a whole table for one such string, which stopped the job and lost the good rows beside it.
        Sources already escape file names; this catches whatever else gets here (a custom source, a model
        that returns such an instruction)."""
        bad = [(i, name) for i, r in enumerate(msg.rows) if (name := unrecordable_field(r)) is not None]
        if not bad:
            return msg.rows, msg.embeddings
        for i, name in bad:
            r = msg.rows[i]
            self._append_error(ErrorRecord(r.id, r.path, "write", "UnencodableTextError",
                                           f"its {name!r} holds a lone surrogate, which a UTF-8 Parquet column "
                                           "cannot store; the row was not written"))
        drop = {i for i, _ in bad}
        keep = [i for i in range(len(msg.rows)) if i not in drop]
        return [msg.rows[i] for i in keep], msg.embeddings[keep]

    def _commit_all(self) -> None:
        while len(self.buffer):
            self._commit(min(self.shard_rows, len(self.buffer)))
        self.errors.sync()

    def _commit(self, n: int) -> None:
        t0 = time.perf_counter()
        rows, emb = self.buffer.take(n)
        number = self._next
        write_shard(self.out_dir, number, rows, emb, self.dim, self.embedding_dtype)
        # errors are fsynced with each shard so the two records advance together
        self.errors.sync()
        self.journal.record(shard_name(number), len(rows))
        self._next += 1
        self.rows_written += len(rows)
        self.shards_written += 1
        self._last_commit = time.monotonic()
        self.progress.add_stage("write", time.perf_counter() - t0)
