"""Archive jobs against inputs and interruptions found by an audit: file names that are not UTF-8 (embedded, recorded
with escapes, never a writer failure), a strict UTF-8 errors.jsonl, duplicate ids in a reordered source (reported
once, never the embedded row), and temp files of interrupted writes (removed, never left behind)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from archive_helpers import FakeEncoder, FakePrepared, read_archive

from wave_rt.archive.job import embed_archive
from wave_rt.archive.journal import ErrorLog, Journal, read_errors
from wave_rt.archive.manifest import atomic_write_text
from wave_rt.archive.progress import Progress
from wave_rt.archive.shards import ShardRow
from wave_rt.archive.writer import ArchiveWriter, EmbeddedRows

WAV_HEADER = b"RIFF"


class FileEncoder(FakeEncoder):
    """FakeEncoder whose media vectors come from the file's bytes (so the file must really be opened, by the path
    the job was given) and which refuses a file that is not a RIFF/WAVE file, naming its path as the media layer
    does (a non-UTF-8 name then appears in the error message too)."""

    def prepare(self, item: Any, instruction: str | None = None, index: int | None = None) -> FakePrepared:
        if isinstance(item, str):
            return super().prepare(item, instruction, index)
        from wave_rt.media.errors import CorruptMediaError

        data = Path(item.source).read_bytes()
        if not data.startswith(WAV_HEADER):
            raise CorruptMediaError(item.source, "not a media container FFmpeg can read")
        return FakePrepared("audio", 8, 1.0, self._vector("audio|" + hashlib.sha256(data).hexdigest()))


def _wav(seed: int) -> bytes:
    return WAV_HEADER + np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()


def _expected_vector(data: bytes) -> np.ndarray:
    return FileEncoder()._vector("audio|" + hashlib.sha256(data).hexdigest())


def _errors_file_is_utf8(out: Path) -> list[dict[str, Any]]:
    raw = (out / "errors.jsonl").read_bytes()
    raw.decode("utf-8")  # strict: the file is valid UTF-8
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- D1: file names
def test_non_utf8_file_names_are_embedded_with_escaped_ids(tmp_path: Path) -> None:
    """A directory with a Latin-1 named good file and a non-UTF-8 named broken one: the good one is embedded (id
    and path recorded with the byte spelled \\xe9), the broken one is an error row, and a rerun has nothing to do.
    Both runs used to stop with WriterFailed (a surrogate in a UTF-8 column / file)."""
    src = tmp_path / "src"
    src.mkdir()
    good, latin = _wav(1), _wav(2)
    (src / "a.wav").write_bytes(good)
    with open(os.fsencode(src) + b"/caf\xe9.wav", "wb") as f:
        f.write(latin)
    with open(os.fsencode(src) + b"/bad\xff.wav", "wb") as f:
        f.write(b"not a wav")
    out = tmp_path / "out"
    s = embed_archive(src, out, model=FileEncoder(), workers=1, decode="threads", progress=False)
    assert (s.embedded, s.failed, s.complete) == (2, 1, True)
    rows = read_archive(out)
    assert set(rows) == {"a.wav", "caf\\xe9.wav"}
    assert rows["caf\\xe9.wav"]["path"] == str(src / "caf\\xe9.wav")
    # the vector is the real file's: it was opened by its real (non-UTF-8) name
    np.testing.assert_array_equal(rows["caf\\xe9.wav"]["embedding"], _expected_vector(latin))
    np.testing.assert_array_equal(rows["a.wav"]["embedding"], _expected_vector(good))
    [err] = _errors_file_is_utf8(out)
    assert (err["id"], err["path"], err["error"]) == ("bad\\xff.wav", str(src / "bad\\xff.wav"), "CorruptMediaError")
    assert err["retryable"] is False
    again = embed_archive(src, out, model=FileEncoder(), workers=1, decode="threads", progress=False)
    assert again.nothing_to_do and again.complete and (again.embedded, again.failed) == (0, 0)
    assert len(read_errors(out)) == 1


def test_json_manifest_surrogate_escapes(tmp_path: Path) -> None:
    r"""A JSON manifest written by Python from os.listdir spells a non-UTF-8 byte "\udce9": that path opens the
    file and is embedded; a lone surrogate that stands for no byte (in a path or a text) is an InvalidRow."""
    from wave_rt.archive.shards import recordable

    src = tmp_path / "src"
    src.mkdir()
    data = _wav(3)
    with open(os.fsencode(src) + b"/caf\xe9.wav", "wb") as f:
        f.write(data)
    rows = [
        {"id": "latin", "path": os.fsdecode(os.fsencode(src) + b"/caf\xe9.wav")},
        {"path": os.fsdecode(os.fsencode(src) + b"/caf\xe9.wav")},  # id from the path: recorded escaped
        {"id": "lone-text", "text": "a \ud800 b"},
        {"id": "lone-path", "path": "x\ud800.wav"},
        {"id": "id-\udcff", "text": "fine"},
        {"id": "ok", "text": "fine too"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")
    out = tmp_path / "out"
    s = embed_archive(manifest, out, model=FileEncoder(), workers=1, decode="threads", progress=False)
    assert s.complete and (s.embedded, s.failed) == (4, 2)
    got = read_archive(out)
    assert set(got) == {"latin", recordable(os.path.normpath(str(src) + "/caf\udce9.wav")), "id-\\xff", "ok"}
    np.testing.assert_array_equal(got["latin"]["embedding"], _expected_vector(data))
    errors = {e["id"]: e for e in _errors_file_is_utf8(out)}
    assert set(errors) == {"lone-text", "lone-path"}
    assert all(e["error"] == "InvalidRow" for e in errors.values())
    assert "not valid Unicode" in errors["lone-text"]["message"]
    assert "can name no file" in errors["lone-path"]["message"]
    assert embed_archive(manifest, out, model=FileEncoder(), workers=1, progress=False).nothing_to_do


def test_writer_turns_an_unencodable_row_into_its_error_and_keeps_the_others(tmp_path: Path) -> None:
    """Whatever reaches the writer (a custom source, say): one row pyarrow cannot store is that item's error
    record; the rows beside it are committed. It used to fail the writer, and with it the whole job."""
    out = tmp_path / "out"
    out.mkdir()
    writer = ArchiveWriter(out, Journal(out), ErrorLog(out), 4, "float32", shard_rows=100, commit_seconds=1e9,
                           progress=Progress(enabled=False))
    rows = [ShardRow("a", "/x/a.wav", "audio", 1.0, None, None),
            ShardRow("b", "/x/b\udcff.wav", "audio", 1.0, None, "what \ud800 is it"),
            ShardRow("c", None, "text", None, "hello", None)]
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.put_rows(EmbeddedRows(rows, emb, tokens=30, audio_seconds=2.0, video_seconds=0.0))
    writer.close()
    got = read_archive(out)
    assert set(got) == {"a", "c"}
    np.testing.assert_array_equal(got["c"]["embedding"], emb[2])
    [err] = _errors_file_is_utf8(out)
    assert (err["id"], err["path"], err["stage"]) == ("b", "/x/b\\xff.wav", "write")
    assert (writer.rows_written, writer.errors_written) == (2, 1)


def test_error_records_stay_readable_and_recover(tmp_path: Path) -> None:
    """errors.jsonl keeps readable non-ASCII text and escapes only what UTF-8 cannot hold; recovery (which
    rewrites the file) reads it back."""
    from wave_rt.archive.journal import ErrorRecord, IdSet

    log = ErrorLog(tmp_path)
    log.append(ErrorRecord("café", "/m/café.wav", "decode", "CorruptMediaError", "'/m/café.wav': bad", False))
    log.append(ErrorRecord("x\udcff", "/m/x\udcff.wav", "decode", "CorruptMediaError", "'/m/x\udcff.wav': bad", False))
    log.append(ErrorRecord("r", "/m/r\udcfe.wav", "model", "RuntimeError", "flaky \ud800", True))
    log.close()
    text = (tmp_path / "errors.jsonl").read_bytes().decode("utf-8")
    assert "café" in text
    done = IdSet()
    assert ErrorLog(tmp_path).recover(done) == 2  # the retryable one is dropped: the file is rewritten
    assert "café" in done and "x\\xff" in done
    assert [e["id"] for e in _errors_file_is_utf8(tmp_path)] == ["café", "x\\xff"]


# ---------------------------------------------------------------------------------------------- D5: duplicates
def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("keep", [10_000, 1])
def test_duplicate_ids_in_a_reordered_source_are_reported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               keep: int) -> None:
    """Two files share an id; the next run lists them the other way round (a regenerated manifest). The file
    embedded first stays the embedded one and is never reported; only the other one is, once. keep=1: the
    scan cannot keep the source and reads it again (same answer)."""
    import wave_rt.archive.job as job

    monkeypatch.setattr(job, "SCAN_KEEP_ITEMS", keep)
    src = tmp_path / "media"
    src.mkdir()
    for i in range(3):
        (src / f"w{i}.wav").write_bytes(_wav(10 + i))
    a, b = {"id": "x", "path": str(src / "w0.wav")}, {"id": "x", "path": str(src / "w1.wav")}
    other = {"id": "y", "path": str(src / "w2.wav")}
    out = tmp_path / "out"
    m = tmp_path / "items.jsonl"
    for rows in ([a, b, other], [b, a, other], [other, b, a], [a, other, b]):
        s = embed_archive(_write_manifest(m, rows), out, model=FileEncoder(), workers=1, progress=False)
        assert s.complete
        assert {k: Path(v["path"]).name for k, v in read_archive(out).items()} == {"x": "w0.wav", "y": "w2.wav"}
        assert [(e["id"], Path(e["path"]).name, e["error"]) for e in read_errors(out)] == [
            ("x", "w1.wav", "DuplicateIdError")]


@pytest.mark.parametrize("keep", [10_000, 1])
def test_finished_ids_moved_files_and_new_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     keep: int) -> None:
    """A finished id whose file moved is still done (nothing reported, nothing embedded again); a new row with a
    finished id is reported once even when it comes before the recorded row."""
    import wave_rt.archive.job as job

    monkeypatch.setattr(job, "SCAN_KEEP_ITEMS", keep)
    src = tmp_path / "media"
    src.mkdir()
    for i in range(3):
        (src / f"w{i}.wav").write_bytes(_wav(20 + i))
    out = tmp_path / "out"
    m = tmp_path / "items.jsonl"
    x0, x1, x2 = ({"id": "x", "path": str(src / f"w{i}.wav")} for i in range(3))
    assert embed_archive(_write_manifest(m, [x0]), out, model=FileEncoder(), progress=False).embedded == 1
    moved = embed_archive(_write_manifest(m, [x2]), out, model=FileEncoder(), progress=False)
    assert moved.nothing_to_do and read_errors(out) == []
    for _ in range(2):
        s = embed_archive(_write_manifest(m, [x1, x0]), out, model=FileEncoder(), progress=False)
        assert s.complete and s.embedded == 0
        assert [(e["id"], Path(e["path"]).name) for e in read_errors(out)] == [("x", "w1.wav")]
    assert Path(read_archive(out)["x"]["path"]).name == "w0.wav"


# ---------------------------------------------------------------------------------------------- D6: temp files
def test_resume_removes_temp_files_of_interrupted_writes(tmp_path: Path) -> None:
    """A kill between a temp write and its rename leaves `.NAME.tmp-PID`: the next run (under the archive's
    lock) removes those of the files the job writes, and nothing else."""
    m = _write_manifest(tmp_path / "m.jsonl", [{"id": f"t{i}", "text": f"text {i}"} for i in range(5)])
    out = tmp_path / "out"
    embed_archive(m, out, model=FakeEncoder(), progress=False)
    stale = [".manifest.json.tmp-4242", ".journal.jsonl.tmp-17", ".errors.jsonl.tmp-99999",
             ".tmp-part-00003-4242.parquet"]
    keep = [".manifest.json.tmp-notapid", ".my-notes", "manifest.json.tmp-12"]
    for name in stale + keep:
        (out / name).write_text("half written")
    s = embed_archive(m, out, model=FakeEncoder(), progress=False)
    assert s.nothing_to_do
    left = {p.name for p in out.iterdir()}
    assert not left & set(stale)
    assert set(keep) <= left


def test_failed_writes_leave_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (a full disk) removes its temp file at once instead of leaving it to a later run."""
    import pyarrow.parquet as pq

    from wave_rt.archive.shards import write_shard

    def full_disk(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(tmp_path / "manifest.json", "{}")
    real_write = pq.write_table

    def partial_then_full(table: Any, where: Any, **k: Any) -> None:
        where.write(b"PAR1 half")
        full_disk()

    monkeypatch.setattr(pq, "write_table", partial_then_full)
    with pytest.raises(OSError, match="No space"):
        write_shard(tmp_path, 0, [ShardRow("a", None, "text", None, "t", None)], np.zeros((1, 4), np.float32), 4,
                    "float32")
    monkeypatch.setattr(pq, "write_table", real_write)
    assert not list(tmp_path.iterdir())


def test_index_save_removes_stale_temp_files_and_its_own_on_failure(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    faiss = pytest.importorskip("faiss", reason="needs faiss: pip install faiss-cpu")
    from wave_rt.archive.index import Index

    m = _write_manifest(tmp_path / "m.jsonl", [{"id": f"t{i}", "text": f"text {i}"} for i in range(12)])
    out = tmp_path / "out"
    embed_archive(m, out, model=FakeEncoder(), progress=False)
    stale = [".index-hnsw.faiss.tmp-4242", ".index-flat.faiss.tmp-7", ".index.json.tmp-4242"]
    for name in stale:
        (out / name).write_bytes(b"a killed save's half index")
    Index.build(out, kind="flat", use_gpu=False)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert Index.load(out).kind == "flat"

    def write_fails(index: Any, path: str) -> None:
        Path(path).write_bytes(b"half")
        raise RuntimeError("Error: 'ret == (n)' failed: write error in index.faiss: 28 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", write_fails)
    with pytest.raises(RuntimeError, match="No space"):
        Index.build(out, kind="hnsw", use_gpu=False)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
