"""`wave_rt.embed_archive`: embed every item of a source into an archive directory, resumably.

    summary = wave_rt.embed_archive("clips/", "clips_emb/")       # bundled demo model
    summary = wave_rt.embed_archive("manifest.jsonl", "out/", model="/ckpt/WAVE-7B", instruction="...")

Re-running the same call after a crash or a kill -9 resumes where it stopped (every good item ends up
exactly once); re-running a finished job does nothing and says so; a run with another model, dtype,
instruction or modality into the same directory is refused (ArchiveMismatchError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from wave_rt.archive.errors import ArchiveFormatError, ArchiveLockedError
from wave_rt.archive.journal import (
    DUPLICATE_ERROR,
    DUPLICATE_STAGE,
    ErrorLog,
    ErrorRecord,
    IdSet,
    Journal,
    duplicate_key,
    id_hash,
)
from wave_rt.archive.manifest import (
    MODEL_KEYS,
    RUN_KEYS,
    RunManifest,
    check_compatible,
    read_manifest,
    write_manifest,
)
from wave_rt.archive.options import JobOptions
from wave_rt.archive.progress import JobSummary, Progress
from wave_rt.archive.shards import list_shards
from wave_rt.archive.sources import ArchiveSource, SourceEntry, open_source
from wave_rt.dtypes import dtype_name

log = logging.getLogger(__name__)

def model_ref(model: Any) -> str:
    """What the manifest records as the model: "demo", an absolute path, or an encoder object's id."""
    if model is None or (isinstance(model, str) and model == "demo"):
        return "demo"
    if isinstance(model, (str, os.PathLike)):
        return os.path.abspath(os.fspath(model))
    return str(getattr(model, "model_path", None) or f"<encoder {getattr(model, 'model_id', type(model).__name__)}>")


@contextlib.contextmanager
def _directory_lock(out_dir: Path) -> Iterator[None]:
    """An advisory lock on DIR/.lock: two jobs must not append to the same archive. The kernel drops it
    when the process dies, so a killed run never leaves a stale lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, run unguarded
        yield
        return
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveLockedError(out_dir) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """While the job runs, the objects that existed before it (the model, torch, transformers: about a
    million) are kept out of the garbage collector's full collections, which would otherwise rescan them
    all whenever the job's own long-lived objects pass a quarter of that count: a 0.19 s pause each time
    on the demo setup, stalling the model. Restored afterwards; left alone if the caller froze objects
    itself or turned the collector off."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------------------------- source scan
@dataclass
class ScanCounts:
    seen: int = 0
    already_done: int = 0
    pending: int = 0
    duplicates: int = 0
    problems: int = 0


@dataclass
class ScanState:
    """What classifying the source learns about ids finished in an earlier run (`done`):

    `recorded`: the duplicate_key (id + path) each finished id was recorded with (its shard row or its error
    record). That row owns the id whatever the order of the rows now: it is 'done', any other row with the
    id is a duplicate. When the recorded row is no longer in the source (a moved file), the first row with the
    id takes its place. Which case holds is known only once the whole source is read, so `present` collects
    the finished ids whose recorded row is in the source, and `ambiguous` says whether a row took a finished
    id's place before that was known; then the source is classified again, with the complete `present`."""

    recorded: IdSet
    present: IdSet | None = None  # complete, from an earlier pass; None: learn it while reading
    ambiguous: bool = False


def _classify(source: Iterable[SourceEntry], done: IdSet, reported_duplicates: IdSet,
              state: ScanState | None = None) -> Iterator[tuple[str, SourceEntry]]:
    """('pending' | 'done' | 'duplicate' | 'problem' | 'reported', item) for every source item, in order.
    Only the first item with a given id is embedded, or for an id finished earlier the item it was recorded
    with (ScanState); the others are duplicates (reported once, ever)."""
    seen = IdSet()
    claimed = IdSet()  # finished ids already given their 'done' row in this pass
    learning = state is not None and state.present is None
    if state is not None and learning:
        state.present = IdSet()
    for item in source:
        h = id_hash(item.id)
        first = not seen.contains_hash(h)
        if first:
            seen.add_hash(h)
        if done.contains_hash(h):
            if state is None:  # without the recorded keys: the first row with the id is the finished one
                owner = first
            else:
                assert state.present is not None
                recorded = state.recorded.contains_hash(duplicate_key(item.id, item.path))
                if recorded and learning:
                    state.present.add_hash(h)
                if claimed.contains_hash(h):
                    owner = False
                elif recorded:
                    owner = True
                else:
                    # the recorded row is not in the source (as far as it is known): this row takes its place
                    owner = not state.present.contains_hash(h)
                    if owner and learning:
                        state.ambiguous = True
            if owner:
                claimed.add_hash(h)
                yield "done", item
                continue
        elif first:
            yield ("problem" if item.problem is not None else "pending"), item
            continue
        if reported_duplicates.contains_hash(duplicate_key(item.id, item.path)):
            yield "reported", item
        else:
            yield "duplicate", item


# A source of up to this many items is read once: the scan keeps what it classified for the job to embed.
# A bigger one is read twice (the scan counts, the job streams), so memory stays flat whatever its size.
SCAN_KEEP_ITEMS = 65536


def _count(classified: Iterable[tuple[str, SourceEntry]]) -> tuple[ScanCounts, list[tuple[str, SourceEntry]] | None]:
    c = ScanCounts()
    kept: list[tuple[str, SourceEntry]] | None = []
    for kind, item in classified:
        if kept is not None:
            kept.append((kind, item))
            if len(kept) > SCAN_KEEP_ITEMS:
                kept = None
        c.seen += 1
        if kind == "done":
            c.already_done += 1
        elif kind == "pending":
            c.pending += 1
        elif kind == "duplicate":
            c.duplicates += 1
        elif kind == "problem":
            c.problems += 1
    return c, kept


def _scan(source: ArchiveSource, done: IdSet, reported: IdSet, state: ScanState | None = None,
          ) -> tuple[ScanCounts, list[tuple[str, SourceEntry]] | None]:
    """The counts, and the classified items themselves for a source of at most SCAN_KEEP_ITEMS. A row that
    took a finished id's place before the id's recorded row came up (ScanState) makes a second pass, over
    the kept items or the source again; the state then holds what pending_items needs to agree."""
    counts, kept = _count(_classify(source, done, reported, state))
    if state is not None and state.ambiguous:
        items: Iterable[SourceEntry] = [item for _, item in kept] if kept is not None else source
        counts, kept = _count(_classify(items, done, reported, state))
    return counts, kept


def pending_items(source: ArchiveSource, done: IdSet, reported: IdSet, report: Any,
                  classified: list[tuple[str, SourceEntry]] | None = None,
                  state: ScanState | None = None) -> Iterator[SourceEntry]:
    """The items still to embed (from `classified`, the scan's, else read again with the scan's `state`);
    malformed rows and duplicate ids are handed to `report` as error records."""
    for kind, item in (classified if classified is not None else _classify(source, done, reported, state)):
        if kind == "pending":
            yield item
        elif kind == "problem":
            report(ErrorRecord(item.id, item.path, "source", "InvalidRow", item.problem or "invalid row"))
        elif kind == "duplicate":
            report(ErrorRecord(item.id, item.path, DUPLICATE_STAGE, DUPLICATE_ERROR,
                               "duplicate id: only the first item with this id is embedded"))


# ---------------------------------------------------------------------------------------------- job
def embed_archive(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: Any = None,
    options: JobOptions | None = None,
    *,
    stream: TextIO | None = None,
    **overrides: Any,
) -> JobSummary:
    """Embed every item of `source` into the archive directory `out` (DESIGN.md section 6).

    source: a directory (media files, recursive), a glob, a manifest (.jsonl/.csv/.tsv/.parquet with
    `path` or `text`, optional `id`, `modality`, `instruction`), a media file, or "demo".
    model: a checkpoint path, None / "demo" for the bundled demo model, or a loaded WaveEncoder.
    options: a JobOptions (wave_rt.archive.options: every setting, its default and meaning); keyword
    arguments override its fields, so `embed_archive(src, out, instruction="...", workers=4)` and
    `embed_archive(src, out, options=JobOptions(instruction="...", workers=4))` are the same job.
    A bad setting raises JobOptionsError before anything is read or written.
    stream: where progress goes (default: stderr).
    Returns a JobSummary; per-item failures are in out/errors.jsonl, not raised."""
    opts = JobOptions.from_kwargs(options, **overrides)
    src = open_source(source, opts.modality)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArchiveFormatError(out_dir, "exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _directory_lock(out_dir), _old_objects_frozen():
        return _run_job(src, out_dir, model, opts, stream if stream is not None else sys.stderr)


def _run_job(src: ArchiveSource, out_dir: Path, model: Any, opts: JobOptions, stream: TextIO) -> JobSummary:
    t_start = time.monotonic()
    existing = read_manifest(out_dir)
    if existing is None and list_shards(out_dir):
        raise ArchiveFormatError(out_dir, "holds part-*.parquet shards but no manifest.json; refusing to add to it")
    ref = model_ref(model)
    run_settings = {"instruction": opts.instruction, "modality": opts.modality,
                    "embedding_dtype": opts.embedding_dtype, "normalized": opts.normalize}
    if existing is not None:
        # settings known without loading the model: refuse early, before a 7B load
        diff = {k: (getattr(existing, k), v) for k, v in run_settings.items() if getattr(existing, k) != v}
        if opts.dtype is not None and opts.dtype != existing.dtype:
            diff["dtype"] = (existing.dtype, opts.dtype)
        if diff:
            from wave_rt.archive.errors import ArchiveMismatchError

            raise ArchiveMismatchError(out_dir, diff)

    journal = Journal(out_dir)
    journal.recover()
    errors = ErrorLog(out_dir)
    done = IdSet()
    state = ScanState(recorded=IdSet())
    journal.done_ids(done, state.recorded)
    errors.recover(done, retry_all=opts.retry_errors, done_keys=state.recorded)
    counts, classified = _scan(src, done, errors.reported_duplicates, state)
    summary = JobSummary(source=src.describe(), out_dir=str(out_dir), engine=opts.engine, seen=counts.seen,
                         already_done=counts.already_done)
    if counts.seen == 0:
        from wave_rt.archive.errors import SourceError

        raise SourceError(src.spec, "no items found (directories are searched for media files by extension)")

    to_do = counts.pending + counts.duplicates + counts.problems
    same_model = existing is not None and existing.model_path == ref
    if to_do == 0 and same_model:
        return _finish_idle(out_dir, existing, journal, errors, summary)

    encoder = load_encoder(model, opts)
    wanted = RunManifest(model_id=str(encoder.model_id), model_path=ref, config_hash=str(encoder.fingerprint),
                         dtype=dtype_name(encoder.dtype), dim=int(encoder.dim), instruction=opts.instruction,
                         modality=opts.modality, embedding_dtype=opts.embedding_dtype, normalized=opts.normalize,
                         wave_rt_version=_version(), source=src.spec)
    summary.model_id, summary.config_hash = wanted.model_id, wanted.config_hash
    summary.dtype, summary.dim = wanted.dtype, wanted.dim
    if existing is not None:
        check_compatible(out_dir, existing, wanted, MODEL_KEYS + RUN_KEYS)
        wanted.created = existing.created
        if to_do == 0:
            return _finish_idle(out_dir, existing, journal, errors, summary)
    manifest = wanted
    manifest.status = "running"
    _update_counts(manifest, journal, errors)
    write_manifest(out_dir, manifest)

    n_workers = opts.decode_workers()
    prog = Progress(total=to_do, stream=stream, log_every=opts.log_every, enabled=opts.progress)
    from wave_rt.archive.writer import ArchiveWriter

    writer = ArchiveWriter(out_dir, journal, errors, manifest.dim, opts.embedding_dtype,
                           opts.rows_per_shard(manifest.dim), opts.commit_seconds, prog)  # the engine starts it
    pending = pending_items(src, done, errors.reported_duplicates, writer.put_error, classified, state)
    interrupted = False
    failure: BaseException | None = None
    try:
        if opts.engine == "local":
            from wave_rt.archive.pipeline import LocalPipeline

            stats = LocalPipeline(encoder, writer, opts).run(pending)
            interrupted = stats.interrupted
            summary.batches, summary.oom_splits = stats.batches, stats.oom_splits
        else:
            from wave_rt.archive.ray_engine import run_ray

            # the workers run in the dtype the manifest records (read from the files, see load_encoder)
            stats = run_ray(pending, writer, model, dataclasses.replace(opts, dtype=manifest.dtype),
                            fingerprint=getattr(encoder, "fingerprint", None))
            interrupted = stats.interrupted
            summary.batches, summary.oom_splits = stats.batches, stats.oom_splits
            n_workers = stats.workers
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as exc:
        failure = exc
    finally:
        try:
            writer.close()  # commits every complete row it holds, even after a failure
        except BaseException as exc:
            if failure is None:
                failure = exc
        prog.close()
    summary.embedded = writer.rows_written
    summary.failed = writer.errors_written
    summary.tokens = prog.tokens
    summary.audio_seconds, summary.video_seconds = prog.audio_seconds, prog.video_seconds
    summary.stage_seconds = dict(prog.stage_seconds)
    summary.workers = n_workers
    summary.wall_seconds = prog.elapsed
    if prog.first_forward_at is not None:
        summary.first_forward_at, summary.last_forward_end_at = prog.first_forward_at, prog.last_forward_end_at
        summary.model_active_seconds = prog.model_active_seconds
    summary.setup_seconds = max(0.0, time.monotonic() - t_start - prog.elapsed)
    summary.interrupted = interrupted
    summary.complete = not interrupted and failure is None
    manifest.status = "complete" if summary.complete else "running"
    _update_counts(manifest, journal, errors)
    write_manifest(out_dir, manifest)
    _fill_totals(summary, journal, errors)
    if failure is not None:
        raise failure
    return summary


def _finish_idle(out_dir: Path, existing: RunManifest, journal: Journal, errors: ErrorLog,
                 summary: JobSummary) -> JobSummary:
    """Nothing left to embed: make sure the manifest says complete, and say so."""
    if existing.status != "complete":
        existing.status = "complete"
        _update_counts(existing, journal, errors)
        write_manifest(out_dir, existing)
    summary.model_id = summary.model_id or existing.model_id
    summary.config_hash = summary.config_hash or existing.config_hash
    summary.dtype, summary.dim = summary.dtype or existing.dtype, summary.dim or existing.dim
    summary.nothing_to_do = True
    summary.complete = True
    _fill_totals(summary, journal, errors)
    return summary


def _update_counts(m: RunManifest, journal: Journal, errors: ErrorLog) -> None:
    m.rows, m.errors, m.shards = journal.rows, errors.count, len(journal.shards)


def _fill_totals(summary: JobSummary, journal: Journal, errors: ErrorLog) -> None:
    summary.rows_total, summary.errors_total, summary.shards_total = journal.rows, errors.count, len(journal.shards)


def _version() -> str:
    from wave_rt import __version__

    return __version__


def load_encoder(model: Any, opts: JobOptions) -> Any:
    """The local engine's encoder; for engine="ray", only the model's identity (id, fingerprint, dtype,
    width) read from the files: the driver never builds the model, the workers do."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if opts.engine == "ray":
            raise ValueError("engine='ray' loads the model in each worker: pass model as a checkpoint path "
                             "(or None for the demo model), not a loaded encoder")
        return model  # a loaded encoder (anything with the WaveEncoder contract)
    path = None if model is None else os.fspath(model)
    if opts.engine == "ray":
        from wave_rt.archive.ray_engine import worker_dtype
        from wave_rt.embed.identity import read_identity

        return read_identity(path, worker_dtype(opts.dtype, opts.ray_address))
    from wave_rt.embed.encoder import WaveEncoder

    return WaveEncoder.from_pretrained(path, device=opts.device, dtype=opts.dtype)
