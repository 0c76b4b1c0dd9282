"""manifest.json: what made the embeddings of an archive directory (model, config hash, dtype, dim,
instruction, wave_rt version) and whether the run finished.

A directory holds embeddings of one setting only: a run whose settings differ from the manifest's is
refused (ArchiveMismatchError) instead of silently mixing vectors that do not share a space.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from wave_rt.archive.errors import ArchiveFormatError, ArchiveMismatchError

MANIFEST_NAME = "manifest.json"
FORMAT = "wave_rt.archive"
FORMAT_VERSION = 1

# Settings that change what an embedding means; a resumed run must match every one.
MODEL_KEYS = ("config_hash", "model_id", "dtype", "dim")
RUN_KEYS = ("instruction", "modality", "embedding_dtype", "normalized")


@dataclass
class RunManifest:
    model_id: str
    model_path: str  # what --model named ("demo" for the bundled model)
    config_hash: str  # WaveEncoder.fingerprint: weights + config/recipe/prompts + dtype
    dtype: str  # model compute dtype, e.g. "float32"
    dim: int
    instruction: str | None
    modality: str
    embedding_dtype: str  # stored vector type: "float32" | "float16"
    normalized: bool
    wave_rt_version: str
    source: str = ""
    status: str = "running"  # "running" | "complete"
    rows: int = 0
    errors: int = 0
    shards: int = 0
    created: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def differences(self, other: RunManifest, keys: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
        return {k: (getattr(self, k), getattr(other, k)) for k in keys if getattr(self, k) != getattr(other, k)}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(out_dir: str | os.PathLike[str]) -> RunManifest | None:
    """The manifest of `out_dir`, or None when there is none yet."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveFormatError(path, f"unreadable manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArchiveFormatError(path, "not a wave_rt archive manifest (no \"format\": \"wave_rt.archive\")")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ArchiveFormatError(path, f"written by a newer wave_rt (format version {data['format_version']}); "
                                       f"this one reads version {FORMAT_VERSION}")
    known = {f for f in RunManifest.__dataclass_fields__}
    try:
        return RunManifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ArchiveFormatError(path, f"incomplete manifest: {exc}") from None


def write_manifest(out_dir: str | os.PathLike[str], manifest: RunManifest) -> None:
    """Atomic replace (temp file, fsync, rename, fsync dir): a kill never leaves a torn manifest."""
    manifest.updated = _now()
    atomic_write_text(Path(out_dir) / MANIFEST_NAME, manifest.to_json())


def check_compatible(out_dir: str | os.PathLike[str], existing: RunManifest, wanted: RunManifest,
                     keys: tuple[str, ...] = MODEL_KEYS + RUN_KEYS) -> None:
    diff = existing.differences(wanted, keys)
    if diff:
        raise ArchiveMismatchError(out_dir, diff)


def temp_path(path: Path) -> Path:
    """The hidden name `path` is written under before its atomic rename (one per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temp_files_of(directory: str | os.PathLike[str], names: Iterable[str]) -> int:
    """Delete the temp files (temp_path) of the files `names` in `directory`: a kill between the write and the
    rename leaves one behind, named after a process id that no later run reuses. Only call this while holding
    the lock of whatever writes those files, or a writer's file could vanish before its rename."""
    patterns = [re.compile(rf"^\.{re.escape(name)}\.tmp-\d+$") for name in names]
    removed = 0
    for p in Path(directory).iterdir():
        if any(pat.match(p.name) for pat in patterns):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write(path: Path, write: Callable[[BinaryIO], object], tmp: Path | None = None) -> None:
    """write(f) into `tmp` (default temp_path), fsync, rename over `path`, fsync the directory: a reader sees
    the old file or the whole new one."""
    tmp = tmp or temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a full disk or an unencodable text must not leave the half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")  # an unencodable text fails before any file is opened
    atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if missing), waiting for it. The kernel drops it when the
    process dies, so a killed holder never leaves a stale lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, run unguarded
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds (Windows): rename is as durable as it gets
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
