"""What an archive job reads: a directory (recursive, by extension), a glob, a manifest
(JSONL / CSV / TSV / Parquet rows with `path` or `text`, optional `id`, `modality`, `instruction`),
a single media file, or "demo" (the bundled demo set).

Every source is a stream of SourceEntries in a deterministic order, read lazily (a manifest of a
million rows is never held in memory). Ids are stable across runs, because resuming a killed job
matches ids: by default the path relative to the source root (as written, for manifests), or
`text:<row>` for text rows without an id.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wave_rt.archive.errors import SourceError
from wave_rt.archive.shards import is_recordable, recordable
from wave_rt.manifest_text import open_text, undecodable

AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aif",
                        ".aiff", ".au", ".caf"})
VIDEO_EXTS = frozenset({".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".flv",
                        ".3gp", ".wmv", ".ogv"})
MEDIA_EXTS = AUDIO_EXTS | VIDEO_EXTS
MANIFEST_EXTS = frozenset({".jsonl", ".ndjson", ".csv", ".tsv", ".parquet"})
MODALITIES = ("auto", "text", "audio", "video", "av")
MANIFEST_COLUMNS = ("id", "path", "text", "modality", "instruction")


@dataclass(frozen=True)
class SourceEntry:
    """One entry of a job's source (a manifest row or a media file found on disk), before it is an Item.
    `path` is absolute; `text` is inline text (embedded when the item's modality is text, else kept as
    metadata); `problem` marks a malformed manifest row (reported, never embedded).

    A file name that is not UTF-8 (legal on Linux) keeps its real bytes in `path` (as os.fsdecode gives them,
    so the file opens) and is recorded in the shards and errors.jsonl with escapes (shards.recordable); the
    id, which is only ever recorded and matched, is that escaped form from the start."""

    id: str
    path: str | None = None
    text: str | None = None
    modality: str = "auto"
    instruction: str | None = None
    problem: str | None = None

    def __post_init__(self) -> None:
        if not is_recordable(self.id):
            object.__setattr__(self, "id", recordable(self.id))


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return modality


class ArchiveSource:
    """Base class: iterate SourceEntries; `spec` is what the user typed, `kind` what it turned out to be."""

    kind = "source"

    def __init__(self, spec: str, modality: str = "auto") -> None:
        self.spec = spec
        self.modality = check_modality(modality)

    def __iter__(self) -> Iterator[SourceEntry]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {self.spec}"

    def _media_item(self, item_id: str, path: str) -> SourceEntry:
        return SourceEntry(id=item_id, path=path, modality=self.modality)


def _posix(rel: str) -> str:
    return rel.replace(os.sep, "/")


class DirectorySource(ArchiveSource):
    """Every media file under a directory (by extension, case-insensitive), walked in sorted order.
    Hidden files and directories (a leading '.') are skipped."""

    kind = "directory"

    def __init__(self, spec: str, root: Path, modality: str = "auto") -> None:
        super().__init__(spec, modality)
        self.root = root
        if self.modality == "text":
            raise SourceError(spec, "--modality text needs a manifest with a 'text' column, not a directory of media")

    def __iter__(self) -> Iterator[SourceEntry]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or Path(name).suffix.lower() not in MEDIA_EXTS:
                    continue
                full = os.path.join(dirpath, name)
                yield self._media_item(_posix(os.path.relpath(full, self.root)), os.path.abspath(full))


class GlobSource(ArchiveSource):
    """Files matching a glob (`**` recurses); ids are relative to the pattern's fixed leading directory.
    The matches are sorted, so they are held in memory: use a directory or a manifest for millions."""

    kind = "glob"

    def __init__(self, spec: str, modality: str = "auto") -> None:
        super().__init__(spec, modality)
        parts = Path(spec).parts
        fixed = []
        for part in parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        self.root = Path(*fixed) if fixed else Path(".")

    def __iter__(self) -> Iterator[SourceEntry]:
        for path in sorted(glob.iglob(self.spec, recursive=True)):
            if os.path.isfile(path):
                yield self._media_item(_posix(os.path.relpath(path, self.root)), os.path.abspath(path))


class FileSource(ArchiveSource):
    """One media file; its id is its file name."""

    kind = "file"

    def __init__(self, spec: str, path: Path, modality: str = "auto") -> None:
        super().__init__(spec, modality)
        self.path = path

    def __iter__(self) -> Iterator[SourceEntry]:
        yield self._media_item(self.path.name, str(self.path.resolve()))


class ManifestSource(ArchiveSource):
    """Rows of a JSONL / CSV / TSV / Parquet manifest. Relative paths are relative to the manifest's folder.

    A row with `path` is a media item (its `text`, if any, is kept as metadata) unless its modality is
    'text': then its `text` is embedded, or the file's UTF-8 content when it has no text. A row with
    only `text` is a text item. A row's own `modality` wins over the job's --modality, which applies
    to rows with a path only."""

    kind = "manifest"

    def __init__(self, spec: str, path: Path, modality: str = "auto") -> None:
        super().__init__(spec, modality)
        self.path = path
        self.base = path.resolve().parent
        self.format = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
                       ".parquet": "parquet"}[path.suffix.lower()]
        self._check_columns()

    def _check_columns(self) -> None:
        if self.format == "parquet":
            pq = _parquet()
            try:
                names = set(pq.ParquetFile(self.path).schema_arrow.names)
            except (OSError, ValueError) as exc:
                raise SourceError(self.spec, f"unreadable Parquet manifest: {exc}") from None
        elif self.format in ("csv", "tsv"):
            with open_text(self.path) as f:
                header = next(csv.reader(f, delimiter="\t" if self.format == "tsv" else ","), None)
            if not header:
                raise SourceError(self.spec, "empty CSV manifest (no header row)")
            names = {h.strip() for h in header}
        else:
            return  # JSONL rows are checked one by one
        if not names & {"path", "text"}:
            raise SourceError(self.spec, f"a manifest needs a 'path' or a 'text' column; it has {sorted(names)}")

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(row number from 0, the row or None, a parse problem or None)."""
        if self.format == "jsonl":
            with open_text(self.path) as f:
                n = 0
                for line in f:
                    if not line.strip():
                        continue
                    bad = undecodable(line)
                    if bad:
                        yield n, None, bad
                        n += 1
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield n, None, f"line is not valid JSON: {exc.msg}"
                    else:
                        if isinstance(row, dict):
                            yield n, row, None
                        else:
                            yield n, None, f"line is a JSON {type(row).__name__}, not an object"
                    n += 1
        elif self.format in ("csv", "tsv"):
            with open_text(self.path) as f:
                reader = csv.DictReader(f, delimiter="\t" if self.format == "tsv" else ",")
                for n, row in enumerate(reader):
                    bad = next((undecodable(v) for v in row.values() if isinstance(v, str) and undecodable(v)), None)
                    if bad:
                        yield n, None, bad
                        continue
                    clean = {(k or "").strip(): (v if v != "" else None) for k, v in row.items()}
                    yield n, clean, None
        else:
            pq = _parquet()
            pf = pq.ParquetFile(self.path)
            columns = [c for c in MANIFEST_COLUMNS if c in pf.schema_arrow.names]
            n = 0
            for batch in pf.iter_batches(batch_size=4096, columns=columns):
                for row in batch.to_pylist():
                    yield n, row, None
                    n += 1

    def __iter__(self) -> Iterator[SourceEntry]:
        for n, row, problem in self._rows():
            if row is None:
                yield SourceEntry(id=f"row:{n}", problem=problem)
                continue
            yield self._item(n, row)

    def _item(self, n: int, row: dict[str, Any]) -> SourceEntry:
        raw_id, path, text = row.get("id"), row.get("path"), row.get("text")
        # the job's --modality is for files; a row without a path is text unless the row itself says otherwise
        modality = row.get("modality") or (self.modality if path is not None else "auto")
        instruction = row.get("instruction") or None
        for name, value in (("path", path), ("text", text), ("modality", modality), ("instruction", instruction)):
            if value is not None and not isinstance(value, str):
                return SourceEntry(id=_default_id(raw_id, path, n), problem=f"'{name}' must be a string, got {value!r}")
        item_id = _default_id(raw_id, path, n)
        for name, value in (("text", text), ("instruction", instruction)):
            if not is_recordable(value):
                # only a JSON escape such as "\ud800" makes one: no UTF-8 column (or tokenizer) can take it
                return SourceEntry(id=item_id, problem=f"'{name}' is not valid Unicode: it holds a lone surrogate "
                                                       "(a \\udXXX escape that stands for no character)")
        if path is not None and not _encodable_path(path):
            return SourceEntry(id=item_id, problem=f"'path' can name no file: it holds a lone surrogate that stands "
                                                   f"for no byte ({recordable(path)})")
        if modality not in MODALITIES:
            return SourceEntry(id=item_id, problem=f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
        if path is None and text is None:
            return SourceEntry(id=item_id, problem="row has neither 'path' nor 'text'")
        if path is None:
            if modality not in ("auto", "text"):
                return SourceEntry(id=item_id, text=text, problem=f"a text row cannot have modality {modality!r}")
            return SourceEntry(id=item_id, text=text, modality="text", instruction=instruction)
        full = path if os.path.isabs(path) else os.path.join(self.base, path)
        return SourceEntry(id=item_id, path=os.path.normpath(full), text=text, modality=modality,
                          instruction=instruction)


def _encodable_path(path: str) -> bool:
    # A JSON manifest written from os.listdir names a non-UTF-8 byte as "\udcXX", which os.fsencode turns
    # back into the byte; any other lone surrogate can name no file.
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def _default_id(raw_id: object, path: object, n: int) -> str:
    if raw_id is not None and str(raw_id) != "":
        return str(raw_id)
    if isinstance(path, str) and path:
        return _posix(os.path.normpath(path))
    return f"text:{n}"


def _parquet() -> Any:
    from wave_rt._optional import require

    return require("pyarrow.parquet", "Parquet manifests")


def open_source(spec: str | os.PathLike[str], modality: str = "auto") -> ArchiveSource:
    """Resolve what the user typed: "demo", a directory, a manifest file, a media file, or a glob."""
    check_modality(modality)
    text = os.fspath(spec)
    path = Path(text)
    if text == "demo" and not path.exists():
        from wave_rt.archive.demo_data import demo_manifest

        return ManifestSource("demo", demo_manifest(), modality)
    if path.is_dir():
        return DirectorySource(text, path, modality)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in MANIFEST_EXTS:
            return ManifestSource(text, path, modality)
        if suffix in MEDIA_EXTS:
            return FileSource(text, path, modality)
        raise SourceError(text, f"unknown file type {suffix or '(none)'}: expected a manifest "
                                f"({', '.join(sorted(MANIFEST_EXTS))}) or a media file")
    if glob.has_magic(text):
        return GlobSource(text, modality)
    raise SourceError(text, "no such file or directory")
