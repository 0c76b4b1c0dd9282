"""`wave_rt.embed_archive`: embed every item of a source into an archive directory, resumably.

    summary = wave_rt.embed_archive("clips/", "clips_emb/")       # bundled demo model
    summary = wave_rt.embed_archive("manifest.jsonl", "out/", model="/ckpt/WAVE-7B", instruction="...")

Re-running the same call after a crash or a kill -9 resumes where it stopped (every good item ends up
exactly once); re-running a finished job does nothing and says so; a run with another model, dtype,
instruction or modality into the same directory is refused (ArchiveMismatchError).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
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
from wave_rt.archive.progress import JobSummary, Progress
from wave_rt.archive.shards import EMBEDDING_DTYPES, list_shards
from wave_rt.archive.sources import ArchiveSource, SourceItem, check_modality, open_source
from wave_rt.dtypes import dtype_name

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def default_workers() -> int:
    """Decode workers: one per core but the one the model thread drives. Media decode runs in a process
    per worker (prepare_pool), so no GIL caps how many pay off; the pool never exceeds the usable cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def default_shard_rows(dim: int, embedding_dtype: str) -> int:
    """About 64 MiB of vectors per shard, between 1,024 and 65,536 rows."""
    per_row = dim * (4 if embedding_dtype == "float32" else 2)
    return max(1024, min(65536, (64 << 20) // max(1, per_row)))


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


# ---------------------------------------------------------------------------------------------- source scan
@dataclass
class ScanCounts:
    seen: int = 0
    already_done: int = 0
    pending: int = 0
    duplicates: int = 0
    problems: int = 0


def _classify(source: ArchiveSource, done: IdSet, reported_duplicates: IdSet) -> Iterator[tuple[str, SourceItem]]:
    """('pending' | 'done' | 'duplicate' | 'problem' | 'reported', item) for every source item, in order.
    Only the first item with a given id is embedded; later ones are duplicates (reported once, ever)."""
    seen = IdSet()
    for item in source:
        h = id_hash(item.id)
        if seen.contains_hash(h):
            if reported_duplicates.contains_hash(duplicate_key(item.id, item.path)):
                yield "reported", item
            else:
                yield "duplicate", item
            continue
        seen.add_hash(h)
        if done.contains_hash(h):
            yield "done", item
        elif item.problem is not None:
            yield "problem", item
        else:
            yield "pending", item


def _scan(source: ArchiveSource, done: IdSet, reported: IdSet) -> ScanCounts:
    c = ScanCounts()
    for kind, _ in _classify(source, done, reported):
        c.seen += 1
        if kind == "done":
            c.already_done += 1
        elif kind == "pending":
            c.pending += 1
        elif kind == "duplicate":
            c.duplicates += 1
        elif kind == "problem":
            c.problems += 1
    return c


def pending_items(source: ArchiveSource, done: IdSet, reported: IdSet, report: Any) -> Iterator[SourceItem]:
    """The items still to embed; malformed rows and duplicate ids are handed to `report` as error records."""
    for kind, item in _classify(source, done, reported):
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
    instruction: str | None = None,
    modality: str = "auto",
    device: Any = None,
    dtype: Any = None,
    max_batch_tokens: int | None = None,
    workers: int | None = None,
    engine: str = "local",
    *,
    embedding_dtype: str = "float32",
    normalize: bool = True,
    shard_rows: int | None = None,
    commit_seconds: float = 60.0,
    retry_errors: bool = False,
    progress: bool = True,
    log_every: float = 30.0,
    stream: TextIO | None = None,
    ray_address: str | None = None,
    decode: str = "auto",
    item_timeout: float | None = 120.0,
) -> JobSummary:
    """Embed every item of `source` into the archive directory `out` (DESIGN.md section 6).

    source: a directory (media files, recursive), a glob, a manifest (.jsonl/.csv/.tsv/.parquet with
    `path` or `text`, optional `id`, `modality`, `instruction`), a media file, or "demo".
    model: a checkpoint path, None / "demo" for the bundled demo model, or a loaded WaveEncoder.
    instruction: replaces the per-modality default prompt of media items (text targets ignore it).
    modality: "auto" (by extension and stream probe) or one of text/audio/video/av for all rows without one.
    decode: where the local engine decodes media: "auto"/"processes" (spawn worker processes, one per core up
    to `workers`) or "threads". item_timeout: seconds one media item may take in a worker process before the
    worker is stopped and the item reported as a DecodeTimeoutError (processes only).
    Returns a JobSummary; per-item failures are in out/errors.jsonl, not raised."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check_modality(modality)
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding_dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {embedding_dtype!r}")
    if max_batch_tokens is not None and max_batch_tokens <= 0:
        raise ValueError("max_batch_tokens must be positive")
    if workers is not None and workers <= 0:
        raise ValueError("workers must be positive")
    src = open_source(source, modality)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArchiveFormatError(out_dir, "exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = stream if stream is not None else sys.stderr
    with _directory_lock(out_dir):
        return _run_job(src, out_dir, model, instruction, modality, device, dtype, max_batch_tokens, workers, engine,
                        embedding_dtype, normalize, shard_rows, commit_seconds, retry_errors, progress, log_every,
                        stream, ray_address, {"decode": decode, "item_timeout": item_timeout})


def _run_job(src: ArchiveSource, out_dir: Path, model: Any, instruction: str | None, modality: str, device: Any,
             dtype: Any, max_batch_tokens: int | None, workers: int | None, engine: str, embedding_dtype: str,
             normalize: bool, shard_rows: int | None, commit_seconds: float, retry_errors: bool, show: bool,
             log_every: float, stream: TextIO, ray_address: str | None,
             decode_options: dict[str, Any] | None = None) -> JobSummary:
    t_start = time.monotonic()
    existing = read_manifest(out_dir)
    if existing is None and list_shards(out_dir):
        raise ArchiveFormatError(out_dir, "holds part-*.parquet shards but no manifest.json; refusing to add to it")
    ref = model_ref(model)
    run_settings = {"instruction": instruction, "modality": modality, "embedding_dtype": embedding_dtype,
                    "normalized": normalize}
    if existing is not None:
        # settings known without loading the model: refuse early, before a 7B load
        diff = {k: (getattr(existing, k), v) for k, v in run_settings.items() if getattr(existing, k) != v}
        if dtype is not None and dtype_name(dtype) != existing.dtype:
            diff["dtype"] = (existing.dtype, dtype_name(dtype))
        if diff:
            from wave_rt.archive.errors import ArchiveMismatchError

            raise ArchiveMismatchError(out_dir, diff)

    journal = Journal(out_dir)
    journal.recover()
    errors = ErrorLog(out_dir)
    done = IdSet()
    journal.done_ids(done)
    errors.recover(done, retry_all=retry_errors)
    counts = _scan(src, done, errors.reported_duplicates)
    summary = JobSummary(source=src.describe(), out_dir=str(out_dir), engine=engine, seen=counts.seen,
                         already_done=counts.already_done)
    if counts.seen == 0:
        from wave_rt.archive.errors import SourceError

        raise SourceError(src.spec, "no items found (directories are searched for media files by extension)")

    to_do = counts.pending + counts.duplicates + counts.problems
    same_model = existing is not None and existing.model_path == ref
    if to_do == 0 and same_model:
        return _finish_idle(out_dir, existing, journal, errors, summary)

    encoder = load_encoder(model, device, dtype, engine, ray_address)
    wanted = RunManifest(model_id=str(encoder.model_id), model_path=ref, config_hash=str(encoder.fingerprint),
                         dtype=dtype_name(encoder.dtype), dim=int(encoder.dim), instruction=instruction,
                         modality=modality, embedding_dtype=embedding_dtype, normalized=normalize,
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

    n_workers = int(workers or default_workers())
    rows_per_shard = int(shard_rows or default_shard_rows(manifest.dim, embedding_dtype))
    prog = Progress(total=to_do, stream=stream, log_every=log_every, enabled=show)
    from wave_rt.archive.writer import ArchiveWriter

    writer = ArchiveWriter(out_dir, journal, errors, manifest.dim, embedding_dtype, rows_per_shard, commit_seconds,
                           prog).start()
    pending = pending_items(src, done, errors.reported_duplicates, writer.put_error)
    interrupted = False
    failure: BaseException | None = None
    try:
        if engine == "local":
            from wave_rt.archive.pipeline import LocalPipeline

            budget = int(max_batch_tokens or encoder.default_max_batch_tokens)
            pipe = LocalPipeline(encoder, writer, instruction=instruction, max_batch_tokens=budget,
                                 workers=n_workers, normalize=normalize, **(decode_options or {}))
            stats = pipe.run(pending)
            interrupted = stats.interrupted
            summary.batches, summary.oom_splits = stats.batches, stats.oom_splits
        else:
            from wave_rt.archive.ray_engine import run_ray

            stats = run_ray(pending, writer, model=model, device=device, dtype=manifest.dtype,
                            instruction=instruction, max_batch_tokens=max_batch_tokens, workers=workers,
                            normalize=normalize, address=ray_address)
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


def load_encoder(model: Any, device: Any, dtype: Any, engine: str = "local", ray_address: str | None = None) -> Any:
    """The local engine's encoder; for engine="ray", only the model's identity (id, fingerprint, dtype,
    width) read from the files: the driver never builds the model, the workers do."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if engine == "ray":
            raise ValueError("engine='ray' loads the model in each worker: pass model as a checkpoint path "
                             "(or None for the demo model), not a loaded encoder")
        return model  # a loaded encoder (anything with the WaveEncoder contract)
    path = None if model is None else os.fspath(model)
    if engine == "ray":
        from wave_rt.archive.ray_engine import worker_dtype
        from wave_rt.embed.identity import read_identity

        return read_identity(path, worker_dtype(dtype, ray_address))
    from wave_rt.embed.encoder import WaveEncoder

    return WaveEncoder.from_pretrained(path, device=device, dtype=dtype)
