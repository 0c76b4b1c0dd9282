"""Journal, error log and shards: recovery after a kill (temp files, torn lines, un-journaled shards), the
compact id set, the manifest checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from wave_rt.archive.errors import ArchiveFormatError, ArchiveMismatchError
from wave_rt.archive.journal import ErrorLog, ErrorRecord, IdSet, Journal, read_errors
from wave_rt.archive.manifest import RunManifest, check_compatible, read_manifest, write_manifest
from wave_rt.archive.shards import ShardRow, list_shards, read_ids, shard_rows, write_shard


def _rows(ids: list[str]) -> tuple[list[ShardRow], np.ndarray]:
    rows = [ShardRow(i, None, "text", None, f"text of {i}", None) for i in ids]
    return rows, np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)


def test_archive_journal_idset_matches_a_python_set() -> None:
    rng = random.Random(3)
    s, ref = IdSet(merge_every=100), set()
    for _ in range(5000):
        x = f"id-{rng.randrange(3000)}"
        s.add(x)
        ref.add(x)
    assert len(s) == len(ref)
    for k in range(4000):
        assert (f"id-{k}" in s) == (f"id-{k}" in ref)
    assert s.nbytes < 8 * len(ref) + 64 * 100 + 1
    # raw hashes: the extremes of uint64, repeats across merges, and the merged array stays strictly sorted
    s, ref = IdSet(merge_every=7), set()
    for h in [0, 2**64 - 1, 0, 5, 2**63, 2**64 - 1] + [rng.getrandbits(64) for _ in range(200)] + [5, 2**63]:
        s.add_hash(h)
        ref.add(h)
    assert len(s) == len(ref) and all(s.contains_hash(h) for h in ref)
    assert bool(np.all(s._sorted[1:] > s._sorted[:-1]))
    assert not any(s.contains_hash(rng.getrandbits(64)) for _ in range(200))


def test_archive_journal_shard_roundtrip(tmp_path: Path) -> None:
    rows, emb = _rows(["a", "b", "c"])
    path = write_shard(tmp_path, 4, rows, emb, 8, "float32")
    assert path.name == "part-00004.parquet" and shard_rows(path) == 3 and read_ids(path) == ["a", "b", "c"]
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    assert t.column_names == ["id", "path", "modality", "duration", "text", "instruction", "embedding"]
    got = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy()).reshape(3, 8)
    assert np.array_equal(got, emb)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError, match="shape"):
        from wave_rt.archive.shards import ShardBuffer

        ShardBuffer(8).add(rows, emb[:2])


def test_archive_journal_recovery_after_kill(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    rows, emb = _rows(["a", "b"])
    write_shard(tmp_path, 0, rows, emb, 8, "float32")
    j.record("part-00000.parquet", 2)
    # killed after rename, before the journal line: a complete shard the journal does not know
    rows2, emb2 = _rows(["c"])
    write_shard(tmp_path, 1, rows2, emb2, 8, "float32")
    # killed while writing the next shard: a temp file, and a torn journal line
    (tmp_path / ".tmp-part-00002-999.parquet").write_bytes(b"PAR1 half a shard")
    with open(tmp_path / "journal.jsonl", "a") as f:
        f.write('{"shard": "part-000')
    j.close()

    j2 = Journal(tmp_path)
    shards = j2.recover()
    assert [(s.name, s.rows) for s in shards] == [("part-00000.parquet", 2), ("part-00001.parquet", 1)]
    assert not (tmp_path / ".tmp-part-00002-999.parquet").exists()
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert [json.loads(x)["shard"] for x in lines] == ["part-00000.parquet", "part-00001.parquet"]
    assert j2.next_number() == 2
    done = j2.done_ids(IdSet())
    assert all(x in done for x in "abc") and "d" not in done
    # a shard listed in the journal but deleted: its items are simply done again
    (tmp_path / "part-00000.parquet").unlink()
    j3 = Journal(tmp_path)
    assert [s.name for s in j3.recover()] == ["part-00001.parquet"]
    assert [p.name for p in list_shards(tmp_path)] == ["part-00001.parquet"]


def test_archive_journal_error_log_recovery(tmp_path: Path) -> None:
    log = ErrorLog(tmp_path)
    log.append(ErrorRecord("a", "/a.wav", "decode", "CorruptMediaError", "bad bytes"))
    log.append(ErrorRecord("b", "/b.wav", "model", "OutOfMemoryError", "oom", retryable=True))
    log.append(ErrorRecord("c", None, "source", "DuplicateIdError", "duplicate id"))
    log.close()
    with open(tmp_path / "errors.jsonl", "a") as f:
        f.write('{"id": "torn", "pa')  # killed mid-line
    done = IdSet()
    log2 = ErrorLog(tmp_path)
    assert log2.recover(done) == 2
    assert "a" in done and "b" not in done and "c" not in done and "torn" not in done
    assert [r["id"] for r in read_errors(tmp_path)] == ["a", "c"]  # retryable and torn records dropped
    done_all = IdSet()
    assert ErrorLog(tmp_path).recover(done_all, retry_all=True) == 1  # only the duplicate note stays
    assert "a" not in done_all


def _manifest(**kw: object) -> RunManifest:
    base = dict(model_id="m", model_path="demo", config_hash="abc", dtype="float32", dim=8, instruction=None,
                modality="auto", embedding_dtype="float32", normalized=True, wave_rt_version="0.1.0")
    base.update(kw)
    return RunManifest(**base)  # type: ignore[arg-type]


def test_archive_journal_manifest_checks(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, _manifest())
    m = read_manifest(tmp_path)
    assert m is not None and m.config_hash == "abc" and m.status == "running"
    check_compatible(tmp_path, m, _manifest(source="elsewhere", rows=5))  # bookkeeping fields never conflict
    with pytest.raises(ArchiveMismatchError) as info:
        check_compatible(tmp_path, m, _manifest(config_hash="def", instruction="Describe."))
    text = str(info.value)
    assert "config_hash: the directory has 'abc', this run would use 'def'" in text and "instruction" in text
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArchiveFormatError, match="unreadable manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ArchiveFormatError, match="not a wave_rt archive"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "wave_rt.archive", "format_version": 99}))
    with pytest.raises(ArchiveFormatError, match="newer wave_rt"):
        read_manifest(tmp_path)


def test_archive_journal_refuses_foreign_shards_and_locks(tmp_path: Path) -> None:
    from archive_helpers import FakeEncoder

    from wave_rt.archive.errors import ArchiveLockedError
    from wave_rt.archive.job import _directory_lock, embed_archive

    (tmp_path / "m.jsonl").write_text('{"text": "a"}\n')
    out = tmp_path / "out"
    out.mkdir()
    rows, emb = _rows(["x"])
    write_shard(out, 0, rows, emb, 8, "float32")
    with pytest.raises(ArchiveFormatError, match="no manifest.json"):
        embed_archive(tmp_path / "m.jsonl", out, model=FakeEncoder(), progress=False)
    out2 = tmp_path / "out2"
    out2.mkdir()
    with _directory_lock(out2):
        with pytest.raises(ArchiveLockedError, match="another wave-rt embed"):
            embed_archive(tmp_path / "m.jsonl", out2, model=FakeEncoder(), progress=False)
    assert embed_archive(tmp_path / "m.jsonl", out2, model=FakeEncoder(), progress=False).embedded == 1
