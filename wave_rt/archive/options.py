"""`JobOptions`: every setting of an archive job, in one place, checked once.

The CLI (`wave-rt embed`), the Python API (`embed_archive(..., options=JobOptions(...))` or its keyword
arguments) and both engines (wave_rt.archive.pipeline, wave_rt.archive.ray_engine) read the same object,
so a setting is named, defaulted and validated here and nowhere else. A bad value raises JobOptionsError
(a ValueError) naming the option and the reason.

The model is not an option: it is what the job runs (a path, "demo", or a loaded encoder), not how.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from wave_rt.archive.errors import JobOptionsError
from wave_rt.archive.shards import EMBEDDING_DTYPES
from wave_rt.archive.sources import MODALITIES

ENGINES = ("local", "ray")
DEFAULT_ITEM_TIMEOUT = 120.0  # seconds one item may take in a decode process; MediaLimits.max_decode_seconds is 60
# Where the local engine decodes media: "processes" (spawn workers, per-item timeout), "threads" (in this
# process, no timeout), "auto" (processes when the encoder can be sent to them).
DECODE_MODES = ("auto", "processes", "threads")


@dataclass(frozen=True)
class JobOptions:
    """How an archive job runs. Every field has a default; `None` means "chosen for this machine/model".

    instruction: replaces the per-modality default prompt of media items (text items ignore it).
    modality: "auto" (by extension and stream probe) or text/audio/video/av for items without a modality.
    device, dtype: where and in which compute dtype the model runs (dtype is stored as "float32",
        "float16" or "bfloat16"; fp32/fp16/bf16 and torch dtypes are accepted).
    max_batch_tokens: token budget per batch, batch size x longest sequence (default: the model's).
    engine: "local" (one process: decode workers + model threads) or "ray" (model replicas on a Ray cluster).
    workers: local engine: decode workers (default: one per usable core but one).
    replicas: ray engine: model replicas (default: one per GPU, or CPUs / 2). For compatibility,
        `workers` given with engine="ray" and no `replicas` is read as the replica count.
    ray_address: the Ray cluster (default: $RAY_ADDRESS or a local Ray); ray engine only.
    embedding_dtype: type of the stored vectors, "float32" or "float16".
    normalize: L2-normalize the stored vectors.
    shard_rows: rows per Parquet shard (default: about 64 MiB of vectors).
    commit_seconds: commit a shard at least this often (bounds the work a kill loses; 0: whenever rows wait).
    retry_errors: try the items of errors.jsonl again.
    progress, log_every: show progress; seconds between progress lines when stderr is not a terminal.
    decode: where the local engine decodes media: "auto"/"processes" (spawn worker processes) or "threads".
    item_timeout: seconds one media item may take in a decode process before it is reported as a
        DecodeTimeoutError (decode processes only; None: no limit).
    """

    instruction: str | None = None
    modality: str = "auto"
    device: str | None = None
    dtype: str | None = None
    max_batch_tokens: int | None = None
    engine: str = "local"
    workers: int | None = None
    replicas: int | None = None
    ray_address: str | None = None
    embedding_dtype: str = "float32"
    normalize: bool = True
    shard_rows: int | None = None
    commit_seconds: float = 60.0
    retry_errors: bool = False
    progress: bool = True
    log_every: float = 30.0
    decode: str = "auto"
    item_timeout: float | None = DEFAULT_ITEM_TIMEOUT

    def __post_init__(self) -> None:
        _choice(self, "engine", ENGINES)
        _choice(self, "modality", MODALITIES)
        _choice(self, "embedding_dtype", tuple(EMBEDDING_DTYPES))
        _choice(self, "decode", DECODE_MODES)
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise JobOptionsError("instruction", self.instruction, "must be a string or None")
        for name in ("max_batch_tokens", "workers", "replicas", "shard_rows"):
            _positive(self, name, integer=True)
        _positive(self, "item_timeout", integer=False)
        for name in ("commit_seconds", "log_every"):  # 0: commit / log at every chance
            _positive(self, name, integer=False, zero=True)
        if self.dtype is not None:
            from wave_rt.dtypes import dtype_name

            try:
                object.__setattr__(self, "dtype", dtype_name(self.dtype))
            except ValueError as exc:
                raise JobOptionsError("dtype", self.dtype, str(exc)) from None
        if self.device is not None:
            import torch

            try:
                object.__setattr__(self, "device", str(torch.device(self.device)))
            except (RuntimeError, TypeError) as exc:
                raise JobOptionsError("device", self.device, str(exc)) from None
        if self.engine == "local":
            for name in ("replicas", "ray_address"):
                if getattr(self, name) is not None:
                    raise JobOptionsError(name, getattr(self, name), "is for engine='ray'")
        elif self.workers is not None:
            if self.replicas is not None:
                raise JobOptionsError("workers", self.workers,
                                      "is the local engine's decode workers; engine='ray' takes replicas")
            object.__setattr__(self, "replicas", self.workers)  # the old spelling of the replica count
            object.__setattr__(self, "workers", None)

    @classmethod
    def from_kwargs(cls, options: JobOptions | None = None, **overrides: Any) -> JobOptions:
        """`options` (default: all defaults) with `overrides` applied; an unknown name is a JobOptionsError."""
        base = options if options is not None else cls()
        if not isinstance(base, JobOptions):
            raise JobOptionsError("options", base, "must be a JobOptions")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise JobOptionsError(unknown[0], overrides[unknown[0]],
                                  f"is not a job option (options: {', '.join(f.name for f in dataclasses.fields(cls))})")
        if not overrides:
            return base
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
        if base.engine == "ray" and base.replicas is not None and "workers" in overrides:
            values["replicas"] = None  # the override restates the replica count in its old spelling
        values.update(overrides)
        return cls(**values)

    def decode_workers(self) -> int:
        """The local engine's decode workers: as given, else one per usable core but the one the model
        thread drives (media decode runs in a process per worker, so no GIL caps how many pay off)."""
        if self.workers is not None:
            return int(self.workers)
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 2
        return max(1, cores - 1)

    def rows_per_shard(self, dim: int) -> int:
        """As given, else about 64 MiB of vectors per shard, between 1,024 and 65,536 rows."""
        if self.shard_rows is not None:
            return int(self.shard_rows)
        per_row = dim * (4 if self.embedding_dtype == "float32" else 2)
        return max(1024, min(65536, (64 << 20) // max(1, per_row)))

    def batch_budget(self, encoder: Any) -> int:
        """Tokens per batch: as given, else the encoder's default."""
        return int(self.max_batch_tokens or encoder.default_max_batch_tokens)


def _choice(opts: JobOptions, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(opts, name)
    if value not in allowed:
        raise JobOptionsError(name, value, f"must be one of {', '.join(allowed)}")


def _positive(opts: JobOptions, name: str, *, integer: bool, zero: bool = False) -> None:
    value = getattr(opts, name)
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (value >= 0 if zero else value > 0):
        what = "whole number" if integer else "number"
        raise JobOptionsError(name, value, f"must be a {'non-negative' if zero else 'positive'} {what}")
