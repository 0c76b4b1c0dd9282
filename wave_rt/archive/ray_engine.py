"""`--engine ray`: the same job on Ray Data, for several GPUs or nodes.

The driver streams the pending items (after the same resume filtering as the local engine) into a
work list of small Parquet files, Ray Data reads it and maps it through a fixed pool of actors (one GPU
each when the cluster has GPUs; each actor loads the model once, decodes with a thread pool, batches
by token budget and embeds with the same out-of-memory splitting as the local engine), and the
driver's ArchiveWriter commits the results. Shards, errors.jsonl, journal and resume are therefore
exactly the local engine's: only the compute moves.

Needs `pip install "ray[data]"`; connects to RAY_ADDRESS / `address=` when given, else starts a local
Ray instance.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.errors import DecodeWorkerCrashError
from wave_rt.archive.journal import ErrorRecord, IdSet, id_hash
from wave_rt.archive.options import JobOptions
from wave_rt.archive.pipeline import PipelineStats, PreparedEntry, error_record, prepare_one
from wave_rt.archive.shards import ShardRow, recordable
from wave_rt.archive.sources import SourceEntry
from wave_rt.archive.writer import ArchiveWriter, EmbeddedRows
from wave_rt.embed.batching import plan_batches
from wave_rt.embed.runner import ModelRunner

log = logging.getLogger(__name__)

WORKLIST_DIR = ".worklist"
WORKLIST_ROWS = 4096
ACTOR_START_TIMEOUT_S = 1800  # a 7B replica reading its weights from a network disk can take minutes
ACTOR_TASK_RETRIES = 2  # tries of a batch whose actor died, after the first


def _ray() -> Any:
    from wave_rt._optional import require

    return require("ray", "--engine ray")


def ensure_ray(address: str | None = None) -> Any:
    """Connect to (or start) Ray once; an already initialized session is reused as it is."""
    ray = _ray()
    _require_ray_data()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    return ray


def _require_ray_data() -> Any:
    from wave_rt._optional import require

    return require("ray.data", "--engine ray")


def cluster_gpus(address: str | None = None) -> int:
    ray = ensure_ray(address)
    return int(ray.cluster_resources().get("GPU", 0))


def worker_dtype(dtype: Any, address: str | None = None) -> Any:
    """The dtype the actors will run in: the one asked for, else bf16 on GPU clusters and fp32 on CPU ones
    (the driver loads the model in the same dtype, so the manifest's fingerprint is the workers')."""
    import torch

    from wave_rt.dtypes import parse_dtype

    if dtype is not None:
        return parse_dtype(dtype)
    return torch.bfloat16 if cluster_gpus(address) > 0 else torch.float32


# ---------------------------------------------------------------------------------------------- work list
def _write_worklist(pending: Iterator[SourceEntry], root: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    names = ("id", "path", "text", "modality", "instruction")
    # paths travel as the file system's bytes: a file name that is not UTF-8 (a str with lone surrogates) fits
    # no Arrow string, and the worker must open the very same file
    schema = pa.schema([pa.field(n, pa.binary() if n == "path" else pa.string()) for n in names])
    total = 0
    part = 0
    chunk: list[SourceEntry] = []

    def flush() -> None:
        nonlocal part
        if chunk:
            cols = {n: [getattr(s, n) for s in chunk] for n in names}
            cols["path"] = [None if p is None else os.fsencode(p) for p in cols["path"]]
            pq.write_table(pa.table(cols, schema=schema), root / f"work-{part:05d}.parquet")
            part += 1
            chunk.clear()

    for item in pending:
        chunk.append(item)
        total += 1
        if len(chunk) >= WORKLIST_ROWS:
            flush()
    flush()
    return total


def _entry(row: dict[str, Any]) -> SourceEntry:
    """A work-list row back as the source item it was written from."""
    return SourceEntry(id=row["id"], path=None if row["path"] is None else os.fsdecode(row["path"]), text=row["text"],
                       modality=row["modality"] or "auto", instruction=row["instruction"])


def _missing(root: Path, received: IdSet) -> list[SourceEntry]:
    """The work-list rows no result came back for (their batch was given up after its actor died every time)."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted(root.glob("work-*.parquet")):
        ids = pq.read_table(f, columns=["id"]).column("id").to_pylist()
        lost = [k for k, i in enumerate(ids) if not received.contains_hash(id_hash(i))]
        if lost:
            out += [_entry(r) for r in pq.read_table(f).take(lost).to_pylist()]
    return out


# ---------------------------------------------------------------------------------------------- actor
class EmbedActor:
    """One model replica. Called by Ray Data with a pyarrow batch of work rows; returns one output row per
    input row: the embedding (zeros on failure) plus the error columns."""

    def __init__(self, model: str | None, options: JobOptions, decode_threads: int, torch_threads: int,
                 fingerprint: str | None = None) -> None:
        import torch

        from wave_rt.embed.encoder import WaveEncoder
        from wave_rt.errors import CheckpointError

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.options = options
        self.encoder = WaveEncoder.from_pretrained(model, device=device, dtype=options.dtype)
        if fingerprint is not None and self.encoder.fingerprint != fingerprint:
            # another copy of the checkpoint on this node (or another file at the same path): its vectors
            # would be mixed into an archive whose manifest names the driver's model
            raise CheckpointError(model or "demo", f"the model on {socket.gethostname()} (fingerprint "
                                  f"{self.encoder.fingerprint}) is not the one the driver read ({fingerprint}): "
                                  "every node must hold the same checkpoint at the same absolute path")
        self.instruction = options.instruction
        self.budget = options.batch_budget(self.encoder)
        self.runner = ModelRunner(self.encoder, self.budget, options.normalize)
        self.decode_threads = max(1, decode_threads)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: Any) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        rows = batch.to_pylist()
        srcs = [_entry(r) for r in rows]
        emb = np.zeros((len(rows), int(self.encoder.dim)), np.float32)
        done: dict[int, PreparedEntry] = {}
        failures: dict[int, ErrorRecord] = {}
        batches_before, splits_before = self.runner.batches, self.runner.oom_splits
        t_prep = t_model = 0.0
        waiting: list[PreparedEntry] = []
        waiting_tokens = 0

        def flush() -> None:
            # embed what is prepared, grouped by length under the token budget, then drop it: prepared
            # media (pixel values, features) is the bulk of an actor's memory
            nonlocal waiting, waiting_tokens, t_model
            t0 = time.perf_counter()
            for group in plan_batches([w.num_tokens for w in waiting], self.budget, None):
                members = [waiting[g] for g in group]
                ok, failed = self.runner.run([w.prepared for w in members])
                for j, vec in ok.items():
                    emb[members[j].key] = vec
                    done[members[j].key] = members[j]
                for j, exc in failed.items():
                    failures[members[j].key] = error_record(members[j].src, "model", exc, retryable=True)
            t_model += time.perf_counter() - t0
            waiting, waiting_tokens = [], 0

        # prepare a few items at a time and embed every ~2 budgets of tokens, so that memory is bounded by
        # the token budget rather than by the number of rows in a call (64 long videos are gigabytes)
        step = 2 * self.decode_threads
        with ThreadPoolExecutor(self.decode_threads) as pool:
            for start in range(0, len(srcs), step):
                t0 = time.perf_counter()
                chunk = list(range(start, min(len(srcs), start + step)))
                prepared = list(pool.map(lambda i: prepare_one(self.encoder, srcs[i], i, self.instruction), chunk))
                t_prep += time.perf_counter() - t0
                for i, p in zip(chunk, prepared):
                    if isinstance(p, ErrorRecord):
                        failures[i] = p
                    else:
                        waiting.append(p)
                        waiting_tokens += p.num_tokens
                if waiting_tokens >= 2 * self.budget:
                    flush()
        flush()
        return self._table(srcs, emb, done, failures, {
            "prepare_s": t_prep, "model_s": t_model, "batches": self.runner.batches - batches_before,
            "oom_splits": self.runner.oom_splits - splits_before})

    def _table(self, srcs: list[SourceEntry], emb: np.ndarray, done: dict[int, PreparedEntry],
               failures: dict[int, ErrorRecord], stats: dict[str, float]) -> Any:
        import pyarrow as pa

        out: dict[str, list[Any]] = {k: [] for k in ("id", "path", "modality", "duration", "text", "instruction",
                                                      "num_tokens", "error_stage", "error_type", "error_message",
                                                      "retryable")}
        for i, src in enumerate(srcs):
            out["id"].append(src.id)
            out["path"].append(recordable(src.path))
            out["text"].append(src.text)
            rec = failures.get(i)
            w = done.get(i)
            if rec is None and w is None:  # cannot happen: every row is embedded or has an error record
                rec = ErrorRecord(src.id, src.path, "model", "RuntimeError", "no result for this item", True)
            if rec is None:
                assert w is not None
                out["modality"].append(w.modality)
                out["duration"].append(None if w.prepared.duration is None else float(w.prepared.duration))
                out["instruction"].append(w.instruction)
                out["num_tokens"].append(int(w.num_tokens))
                out["error_stage"].append(None)
                out["error_type"].append(None)
                out["error_message"].append(None)
                out["retryable"].append(False)
            else:
                out["modality"].append(src.modality)
                out["duration"].append(None)
                out["instruction"].append(None)
                out["num_tokens"].append(0)
                out["error_stage"].append(rec.stage)
                out["error_type"].append(rec.error)
                out["error_message"].append(rec.message)
                out["retryable"].append(bool(rec.retryable))
        n = len(srcs)
        # explicit types: a column that is all None in one call must not become a `null` column that does not
        # concatenate with the same column of another call
        types = {"duration": pa.float64(), "num_tokens": pa.int64(), "retryable": pa.bool_()}
        table = pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in out.items()})
        dim = emb.shape[1]
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim))
        table = table.append_column("worker", pa.array([self.worker_id] * n, pa.string()))
        # per-call accounting rides on the first row (the driver sums the columns)
        for name, value in stats.items():
            col = [0.0] * n
            if n:
                col[0] = float(value)
            table = table.append_column(name, pa.array(col, pa.float64()))
        return table


# ---------------------------------------------------------------------------------------------- driver
def run_ray(pending: Iterator[SourceEntry], writer: ArchiveWriter, model: Any, options: JobOptions, *,
            rows_per_call: int | None = None, fingerprint: str | None = None) -> PipelineStats:
    """Embed `pending` on a pool of Ray actors and hand the results to `writer` (which owns the directory).

    The actors get `options` as they are (instruction, dtype, max_batch_tokens, normalize; replicas and
    ray_address are the driver's). rows_per_call: rows per actor call (default: up to 64, fewer for a short
    work list so that every actor gets a share). fingerprint: the model identity the driver read from the files;
    an actor whose loaded model differs refuses to start."""
    if options.engine != "ray":
        raise ValueError(f"run_ray runs engine='ray' jobs, not engine={options.engine!r}")
    ray = ensure_ray(options.ray_address)
    rdata = _require_ray_data()
    writer.start()  # results arrive on this thread: the writer's own thread commits while it pulls the next
    progress = writer.progress
    stats = PipelineStats()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    n_actors = int(options.replicas or (gpus if gpus > 0 else max(1, int(cpus) // 2)))
    if gpus > 0 and n_actors > gpus:
        log.warning("%d Ray workers asked for but the cluster has %d GPUs: using %d", n_actors, gpus, gpus)
        n_actors = gpus
    root = writer.out_dir / WORKLIST_DIR
    total = _write_worklist(pending, root)
    if total == 0:
        shutil.rmtree(root, ignore_errors=True)
        return stats
    # Ray Data's file listing and read tasks each ask for a whole logical CPU: actors that reserve every
    # CPU of the cluster would leave them unschedulable and the job would wait forever. Keep one free.
    cpus_per_actor = max(0.05, min(1.0, (cpus - 1.0) / n_actors))
    # absolute: actors run in the cluster's working directory, not the driver's
    where = None if model is None else os.fspath(model)
    ctor = dict(model=where if where in (None, "demo") else os.path.abspath(where), options=options,
                fingerprint=fingerprint,
                decode_threads=max(1, int(cpus) // max(1, n_actors)) if gpus == 0 else 4,
                torch_threads=max(1, int(cpus) // max(1, n_actors)) if gpus == 0 else 0)
    if not progress.enabled:
        # --no-progress: Ray Data's own progress bars / log lines too
        rdata.DataContext.get_current().enable_progress_bars = False
    per_call = int(rows_per_call or max(1, min(64, math.ceil(total / (4 * n_actors)))))
    seen_workers: set[str] = set()
    received = IdSet()  # ids of the rows a result (vector or error record) came back for
    run = dict(rdata=rdata, ctor=ctor, n_actors=n_actors, gpus=gpus, cpus_per_actor=cpus_per_actor, writer=writer,
               progress=progress, stats=stats, workers=seen_workers, received=received)
    try:
        _run_pass(root, per_call, **run)
        missing = _missing(root, received)
        if missing and per_call > 1:
            # a batch whose actor died on every try (a decoder crash, the OOM killer on one huge clip): its rows
            # again, one per call, so that the others are embedded and the one that kills actors is found
            log.warning("%d work-list rows came back from no Ray actor (their actor died on every try): running "
                        "them again one per call", len(missing))
            retry = root / "retry"
            _write_worklist(iter(missing), retry)
            run["n_actors"] = min(n_actors, len(missing))
            _run_pass(retry, 1, **run)
            missing = _missing(retry, received)
        for src in missing:
            exc = DecodeWorkerCrashError(src.path or src.id, "a Ray actor process died on it", ACTOR_TASK_RETRIES + 1)
            writer.put_error(error_record(src, "prepare", exc, retryable=True))
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stats.workers = len(seen_workers)
    return stats


def _run_pass(root: Path, per_call: int, *, rdata: Any, ctor: dict[str, Any], n_actors: int, gpus: int,
              cpus_per_actor: float, writer: ArchiveWriter, progress: Any, stats: PipelineStats, workers: set[str],
              received: IdSet) -> None:
    """One Ray Data pass over the work list under `root`, `per_call` rows per actor call."""
    ds = rdata.read_parquet(os.path.abspath(root))  # read by tasks in the cluster's working directory
    # A work-list file is one block, and the actor pool hands out whole blocks: without this a 4,096-row
    # file would go to a single actor while the others idle. Streaming repartition (no shuffle).
    try:
        ds = ds.repartition(target_num_rows_per_block=per_call)
    except TypeError:  # an older Ray without streaming repartition: whole work-list files are the unit
        log.info("this Ray has no streaming repartition: work is spread over actors one work-list file at a time")
    # Ray Data retries an actor task without end by default (max_task_retries=-1): one item that kills its
    # actor every time would loop until the no-progress timeout. A bounded number of tries, then the batch is
    # dropped (max_errored_blocks) and its rows found missing by the driver.
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs=ctor, batch_size=per_call, batch_format="pyarrow",
                        compute=rdata.ActorPoolStrategy(size=n_actors), num_gpus=1 if gpus > 0 else 0,
                        num_cpus=cpus_per_actor, max_task_retries=ACTOR_TASK_RETRIES)
    ctx = getattr(ds, "context", None)
    if ctx is not None:
        ctx.max_errored_blocks = -1
        if getattr(ctx, "wait_for_min_actors_s", 1) <= 0:
            # Every replica loads its model before work is handed out: otherwise the first one ready takes
            # blocks the others would have had, and a pool the cluster cannot fit would wait forever instead
            # of failing with Ray's "Timed out while starting actors".
            ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        _consume(table, writer, progress, stats, workers, received)


def _consume(table: Any, writer: ArchiveWriter, progress: Any, stats: PipelineStats, workers: set[str],
             received: IdSet) -> None:
    n = table.num_rows
    if not n:
        return
    cols = table.drop_columns(["embedding"]).to_pydict()  # vectors stay numpy, never Python floats
    workers.update(cols["worker"])
    for i in cols["id"]:
        received.add_hash(id_hash(i))
    emb = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                     dtype=np.float32).reshape(n, -1)
    progress.add_stage("prepare", float(sum(cols["prepare_s"])))
    progress.add_stage("model", float(sum(cols["model_s"])))
    stats.batches += int(sum(cols["batches"]))
    stats.oom_splits += int(sum(cols["oom_splits"]))
    good: list[int] = []
    for i in range(n):
        if cols["error_stage"][i] is None:
            good.append(i)
        else:
            writer.put_error(ErrorRecord(cols["id"][i], cols["path"][i], cols["error_stage"][i], cols["error_type"][i],
                                         cols["error_message"][i], bool(cols["retryable"][i])))
    if good:
        rows = [ShardRow(cols["id"][i], cols["path"][i], cols["modality"][i], cols["duration"][i], cols["text"][i],
                    cols["instruction"][i]) for i in good]
        mods = cols["modality"]
        dur = cols["duration"]
        writer.put_rows(EmbeddedRows(
            rows, emb[good], int(sum(cols["num_tokens"][i] for i in good)),
            float(sum(dur[i] or 0.0 for i in good if mods[i] in ("audio", "av"))),
            float(sum(dur[i] or 0.0 for i in good if mods[i] in ("video", "av"))),
        ))
