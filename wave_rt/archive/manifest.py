"""manifest.json: what made the embeddings of an archive directory (model, config hash, dtype, dim,
instruction, wave_rt version) and whether the run finished.

A directory holds embeddings of one setting only: a run whose settings differ from the manifest's is
refused (ArchiveMismatchError) instead of silently mixing vectors that do not share a space.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
