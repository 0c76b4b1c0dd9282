"""Parquet shards of an archive: `part-NNNNN.parquet` with columns

    id: string, path: string?, modality: string, duration: double?, text: string?, instruction: string?,
    embedding: fixed_size_list<float32|float16>[dim]

A shard is written under a hidden temp name, fsynced, renamed, and the directory fsynced: a reader
that lists `part-*.parquet` can only ever see complete shards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.errors import ArchiveFormatError
from wave_rt.archive.manifest import atomic_write

SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
TMP_PREFIX = ".tmp-part-"
META_COLUMNS = ("id", "path", "modality", "duration", "text", "instruction")
EMBEDDING_DTYPES = {"float32": np.float32, "float16": np.float16}


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def shard_number(name: str) -> int | None:
    m = SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def list_shards(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Committed shards on disk, in shard-number order (temp files never match)."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = [(shard_number(p.name), p) for p in root.iterdir()]
    return [p for n, p in sorted((n, p) for n, p in found if n is not None)]


def _pa() -> Any:
    import pyarrow as pa

    return pa


def shard_schema(dim: int, embedding_dtype: str) -> Any:
    pa = _pa()
    value_type = pa.float32() if embedding_dtype == "float32" else pa.float16()
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("duration", pa.float64()),
        pa.field("text", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("embedding", pa.list_(value_type, dim), nullable=False),
    ])


def is_recordable(text: str | None) -> bool:
    """Whether a UTF-8 column or file can hold `text` as it is (not so for lone surrogates)."""
    if text is None or text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def recordable(text: str | None) -> str | None:
    r"""`text` as the archive records it (ids, paths, messages): Parquet strings and errors.jsonl are UTF-8, so
    a str that cannot be encoded, like a file name with bytes that are not UTF-8 (os.walk hands those over as
    lone surrogates, PEP 383), gets them spelled out as escapes: the name b"caf\xe9.wav" is recorded as the
    text `caf\xe9.wav` (backslash, x, e, 9); other lone surrogates as `\udXXX`. Valid text is returned
    unchanged, so applying it twice changes nothing."""
    if is_recordable(text):
        return text
    assert text is not None
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (e.g. a JSON "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class ShardRow:
    """The metadata columns of one Parquet row of a shard (the embedding travels beside it, in blocks)."""

    id: str
    path: str | None
    modality: str
    duration: float | None
    text: str | None
    instruction: str | None


def unrecordable_field(row: ShardRow) -> str | None:
    """The first string column of `row` that a UTF-8 Parquet column cannot hold (None: all can): pyarrow would
    refuse the whole shard for it, every good row with it."""
    for name in ("id", "path", "modality", "text", "instruction"):
        if not is_recordable(getattr(row, name)):
            return name
    return None


@dataclass
class ShardBuffer:
    """Rows waiting for the next shard; embeddings are kept as the float32 blocks the model returned."""

    dim: int
    rows: list[ShardRow] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)

    def add(self, rows: list[ShardRow], embeddings: np.ndarray) -> None:
        if embeddings.shape != (len(rows), self.dim):
            raise ValueError(f"expected embeddings of shape {(len(rows), self.dim)}, got {embeddings.shape}")
        self.rows.extend(rows)
        self.blocks.append(embeddings)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, n: int) -> tuple[list[ShardRow], np.ndarray]:
        """Remove and return the first n rows with their embeddings as one [n, dim] array."""
        emb = np.concatenate(self.blocks) if self.blocks else np.empty((0, self.dim), np.float32)
        rows, self.rows = self.rows[:n], self.rows[n:]
        head, tail = emb[:n], emb[n:]
        self.blocks = [tail] if len(tail) else []
        return rows, head


def build_table(rows: list[ShardRow], embeddings: np.ndarray, dim: int, embedding_dtype: str) -> Any:
    pa = _pa()
    schema = shard_schema(dim, embedding_dtype)
    values = np.ascontiguousarray(embeddings, dtype=EMBEDDING_DTYPES[embedding_dtype]).reshape(-1)
    columns = {name: [getattr(r, name) for r in rows] for name in META_COLUMNS}
    arrays = [pa.array(columns[name], type=schema.field(name).type) for name in META_COLUMNS]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values), dim))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(out_dir: str | os.PathLike[str], number: int, rows: list[ShardRow], embeddings: np.ndarray,
                dim: int, embedding_dtype: str) -> Path:
    """Write one shard atomically; returns its final path."""
    import pyarrow.parquet as pq

    root = Path(out_dir)
    final = root / shard_name(number)
    tmp = root / f"{TMP_PREFIX}{number:05d}-{os.getpid()}.parquet"
    table = build_table(rows, embeddings, dim, embedding_dtype)
    atomic_write(final, lambda f: pq.write_table(table, f, compression="zstd"), tmp)
    return final


def remove_temp_files(out_dir: str | os.PathLike[str]) -> int:
    """Delete shards a killed run left half-written; they were never renamed, so nothing refers to them."""
    root = Path(out_dir)
    removed = 0
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _damaged(path: str | os.PathLike[str], exc: Exception) -> ArchiveFormatError:
    # Shards are renamed into place only once complete, so a file Parquet cannot read was damaged
    # afterwards; the journal re-embeds the items of a shard that is gone, hence the advice.
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return ArchiveFormatError(path, f"damaged shard, not a readable Parquet file ({reason}); delete it and "
                                    "re-run the same `wave-rt embed` to embed its items again")


def _is_damage(exc: Exception) -> bool:
    import pyarrow as pa

    # pyarrow reports some corruption (bad thrift footers) as a bare OSError without errno; real OS
    # errors (permissions, a vanished file) are subclasses or carry an errno, and are not the file's fault.
    return isinstance(exc, pa.ArrowException) or (type(exc) is OSError and exc.errno is None)


def read_columns(path: str | os.PathLike[str], columns: list[str]) -> Any:
    """`columns` of one shard as a pyarrow Table; a damaged shard raises ArchiveFormatError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:
        if _is_damage(exc):
            raise _damaged(path, exc) from None
        raise


def read_ids(path: str | os.PathLike[str]) -> list[str]:
    return read_columns(path, ["id"]).column("id").to_pylist()


def shard_rows(path: str | os.PathLike[str]) -> int:
    """Row count from the footer; a file that is not a complete Parquet file raises ArchiveFormatError."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:
        if _is_damage(exc):
            raise _damaged(path, exc) from None
        raise
