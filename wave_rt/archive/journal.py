"""The progress journal: what a killed run already finished, so that a re-run resumes exactly there.

Truth lives in two append-only records:
- `journal.jsonl`: one line per committed shard (name, rows), appended after the shard's rename.
  A shard renamed just before a kill but not yet journaled is complete (the rename is atomic and
  came after fsync), so recovery adopts it; temp files are deleted; a torn last line is cut off.
- `errors.jsonl`: one line per failed item (id, path, stage, error, message, retryable). Permanent
  failures (bad media, bad input) count as done; retryable ones (unexpected exceptions, out of memory
  on a single item) are dropped on the next run and tried again.

The set of finished ids is kept as 64-bit hashes (IdSet, 8 bytes per item) so that resuming a
million-item job does not hold a million Python strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.manifest import MANIFEST_NAME, atomic_write_text, remove_temp_files_of
from wave_rt.archive.shards import (
    is_recordable,
    list_shards,
    read_columns,
    read_ids,
    recordable,
    remove_temp_files,
    shard_number,
    shard_rows,
)

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
ERRORS_NAME = "errors.jsonl"
DUPLICATE_STAGE = "source"
DUPLICATE_ERROR = "DuplicateIdError"


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line that a strict UTF-8 file can hold: readable non-ASCII text as it is, and \\u escapes
    (still valid JSON, read back the same) when the record holds a lone surrogate, which UTF-8 cannot encode."""
    line = json.dumps(record, ensure_ascii=False)
    return line if is_recordable(line) else json.dumps(record, ensure_ascii=True)


def id_hash(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class IdSet:
    """A set of 64-bit hashes: a sorted numpy array plus a small Python set merged in every 64k adds.
    Membership of a hash collision (p ~ n^2 / 2^65: 3e-8 for a million ids) would skip one item."""

    def __init__(self, merge_every: int = 65536) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._merge_every = merge_every

    def add(self, item_id: str) -> None:
        self.add_hash(id_hash(item_id))

    def add_hash(self, h: int) -> None:
        self._recent.add(h)
        if len(self._recent) >= self._merge_every:
            self._merge()

    def _merge(self) -> None:
        if not self._recent:
            return
        fresh = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        fresh.sort()
        self._recent = set()
        old = self._sorted
        if not len(old):
            self._sorted = fresh
            return
        # Insert the new hashes in place of np.union1d, whose concatenate + unique needs several times
        # the array in temporaries: this one needs the new array plus a byte per entry.
        at = np.searchsorted(old, fresh)
        inside = at < len(old)
        known = np.zeros(len(fresh), dtype=bool)
        known[inside] = old[at[inside]] == fresh[inside]
        self._sorted = np.insert(old, at[~known], fresh[~known])

    def contains_hash(self, h: int) -> bool:
        if h in self._recent:
            return True
        s = self._sorted
        if not len(s):
            return False
        key = np.uint64(h)
        i = int(np.searchsorted(s, key))
        return i < len(s) and s[i] == key

    def __contains__(self, item_id: str) -> bool:
        return self.contains_hash(id_hash(item_id))

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes) + 64 * len(self._recent)


@dataclass(frozen=True)
class ShardRecord:
    name: str
    rows: int


def _read_jsonl_records(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of an append-only file; a torn last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: torn tail
        line = data[pos:nl]
        if line.strip():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break  # a torn line in the middle can only be the tail of an interrupted write
            if isinstance(rec, dict):
                records.append(rec)
        pos = good_end = nl + 1
    if good_end < len(data):
        log.warning("%s: dropping %d bytes of an interrupted write", path, len(data) - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


class Journal:
    """Committed shards, reconciled with the files on disk."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / JOURNAL_NAME
        self.shards: list[ShardRecord] = []
        self._file: Any = None

    def recover(self) -> list[ShardRecord]:
        """Clean up after a killed run and return the committed shards. Called by the job, under the archive
        directory's lock, so no other writer's temp file can be in flight."""
        removed = remove_temp_files(self.out_dir)
        if removed:
            log.info("%s: removed %d partial shard(s) of an interrupted run", self.out_dir, removed)
        removed = remove_temp_files_of(self.out_dir, (MANIFEST_NAME, JOURNAL_NAME, ERRORS_NAME))
        if removed:
            log.info("%s: removed %d temp file(s) of an interrupted run", self.out_dir, removed)
        listed = {}
        for rec in _read_jsonl_records(self.path):
            name = rec.get("shard")
            if isinstance(name, str) and shard_number(name) is not None:
                listed[name] = int(rec.get("rows", -1))
        on_disk = {p.name: p for p in list_shards(self.out_dir)}
        shards: list[ShardRecord] = []
        changed = False
        for name in sorted(set(listed) | set(on_disk), key=lambda n: shard_number(n) or 0):
            if name not in on_disk:
                log.warning("%s: shard %s is in the journal but missing on disk; its items will be embedded again",
                            self.out_dir, name)
                changed = True
                continue
            rows = shard_rows(on_disk[name])
            if name not in listed:
                log.info("%s: adopting shard %s (committed just before an interruption)", self.out_dir, name)
                changed = True
            elif listed[name] != rows:
                log.warning("%s: shard %s has %d rows, the journal says %d; trusting the file",
                            self.out_dir, name, rows, listed[name])
                changed = True
            shards.append(ShardRecord(name, rows))
        self.shards = shards
        if changed:
            atomic_write_text(self.path, "".join(json.dumps({"shard": s.name, "rows": s.rows}) + "\n" for s in shards))
        return shards

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def next_number(self) -> int:
        numbers = [shard_number(s.name) or 0 for s in self.shards]
        return max(numbers) + 1 if numbers else 0

    def done_ids(self, into: IdSet, keys: IdSet | None = None) -> IdSet:
        """Add the id of every committed row to `into`, and its duplicate_key (id and path) to `keys`."""
        for s in self.shards:
            if keys is None:
                for item_id in read_ids(self.out_dir / s.name):
                    into.add(item_id)
                continue
            table = read_columns(self.out_dir / s.name, ["id", "path"])
            for item_id, path in zip(table.column("id").to_pylist(), table.column("path").to_pylist()):
                into.add(item_id)
                keys.add_hash(duplicate_key(item_id, path))
        return into

    def record(self, name: str, rows: int) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"shard": name, "rows": rows}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.shards.append(ShardRecord(name, rows))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class ErrorRecord:
    id: str
    path: str | None
    stage: str  # "source" | "decode" | "preprocess" | "model" | "write"
    error: str  # exception class name
    message: str
    retryable: bool = False

    def __post_init__(self) -> None:
        # Recorded as the shards record them: a non-UTF-8 file name in the path or in the message (errors
        # quote the path they failed on) is spelled out with escapes instead of failing the write.
        self.id = recordable(self.id) or ""
        self.path = recordable(self.path)
        self.message = recordable(self.message) or ""

    def to_json(self) -> str:
        return json_line({"id": self.id, "path": self.path, "stage": self.stage, "error": self.error,
                          "message": self.message, "retryable": self.retryable})


def duplicate_key(item_id: str, path: str | None) -> int:
    """A row's (id, path) as recorded, hashed: a source's raw path and its recorded form give the same key."""
    if not isinstance(path, str):  # a hand-edited record; None for text rows
        path = None
    return id_hash(f"{recordable(str(item_id))}\0{recordable(path) or ''}")


class ErrorLog:
    """errors.jsonl: appended line by line (flushed to the kernel at once, fsynced at shard commits)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / ERRORS_NAME
        self._file: Any = None
        self.count = 0
        self.reported_duplicates = IdSet()

    def recover(self, done: IdSet, retry_all: bool = False, done_keys: IdSet | None = None) -> int:
        """Add permanently failed ids to `done` (and their duplicate_key to `done_keys`); drop retryable records
        (all with retry_all) so that their items are tried again. Returns the number of records kept."""
        records = _read_jsonl_records(self.path)
        keep: list[dict[str, Any]] = []
        for rec in records:
            duplicate = rec.get("error") == DUPLICATE_ERROR
            if not duplicate and (retry_all or rec.get("retryable")):
                continue
            keep.append(rec)
            item_id = str(rec.get("id"))
            if duplicate:
                self.reported_duplicates.add_hash(duplicate_key(item_id, rec.get("path")))
            else:
                done.add(item_id)
                if done_keys is not None:
                    done_keys.add_hash(duplicate_key(item_id, rec.get("path")))
        if len(keep) != len(records):
            atomic_write_text(self.path, "".join(json_line(r) + "\n" for r in keep))
        self.count = len(keep)
        return len(keep)

    def append(self, rec: ErrorRecord) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(rec.to_json() + "\n")
        self._file.flush()
        self.count += 1

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def committed_shards(out_dir: str | os.PathLike[str]) -> list[ShardRecord]:
    """Read-only view for readers (index, tests) while a job may be running: every `part-*.parquet` is
    complete by construction (temp name until fsync + rename); row counts come from the footers."""
    return [ShardRecord(p.name, shard_rows(p)) for p in list_shards(out_dir)]


def read_errors(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of DIR/errors.jsonl (for callers and tests)."""
    path = Path(out_dir) / ERRORS_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def hashes_of(ids: Iterable[str]) -> IdSet:
    s = IdSet()
    for i in ids:
        s.add(i)
    return s
