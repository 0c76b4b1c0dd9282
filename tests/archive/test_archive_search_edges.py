"""Edges of archive search: tie order of the exact kinds (FAISS flat included, at the k-th place too), damaged
archive files (index.json, a saved FAISS index, a shard) and a bad --nlist as typed one-line errors, a saved
ANN index on a machine without faiss (exact search instead, with a warning), and the advice of a query model
or dtype that is not the archive's."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from archive_helpers import FakeEncoder

from wave_rt.archive.errors import (
    ArchiveFormatError,
    ArchiveMismatchError,
    IndexOptionsError,
    SearchMismatchError,
)
from wave_rt.archive.index import Index
from wave_rt.archive.job import embed_archive
from wave_rt.cli import run
from wave_rt.errors import MissingDependencyError

DIM = 32
TEXTS = 8
COPIES = 5


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows: 8 distinct texts, 5 copies each, scattered over 3 shards. Copies have identical vectors
    (exact ties); distinct texts score far apart, so the expected ranking is unambiguous."""
    root = tmp_path_factory.mktemp("copies")
    order = np.random.default_rng(3).permutation(TEXTS * COPIES) % TEXTS
    with open(root / "m.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(order):
            f.write(json.dumps({"id": f"row{i:03d}", "text": f"text {t}"}) + "\n")
    out = root / "archive"
    embed_archive(root / "m.jsonl", out, model=FakeEncoder(dim=DIM), workers=1, shard_rows=15, progress=False)
    return out


def _expected(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    exact = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return [np.argsort(-row, kind="stable")[:k].tolist() for row in exact]


@pytest.mark.parametrize("kind", ["flat", "flat-gpu"])
def test_exact_kinds_break_ties_by_lower_row_at_the_cut(copies: Path, kind: str) -> None:
    if kind == "flat":
        pytest.importorskip("faiss", reason="needs faiss: pip install faiss-cpu")
    index = Index.build(copies, kind=kind, save=False, use_gpu=False)
    vectors = index.embeddings()
    # one query per distinct text (a few: FAISS's direct path) and every row (FAISS's BLAS path)
    for queries in (vectors[:3], vectors):
        for k in (1, 3, COPIES, COPIES + 2, 12, len(vectors)):
            got = [[h.position for h in hits] for hits in index.search(queries, k=k)]
            assert got == _expected(vectors, queries, k), (kind, k)


def test_flat_ties_at_the_cut_many_copies(tmp_path: Path) -> None:
    """Rows 0..299 tie (one text) and row 300 differs: k=3 is rows 0, 1, 2 whatever FAISS's heap keeps."""
    pytest.importorskip("faiss", reason="needs faiss: pip install faiss-cpu")
    with open(tmp_path / "m.jsonl", "w", encoding="utf-8") as f:
        for i in range(301):
            f.write(json.dumps({"id": f"r{i:03d}", "text": "same" if i < 300 else "other"}) + "\n")
    embed_archive(tmp_path / "m.jsonl", tmp_path / "a", model=FakeEncoder(dim=DIM), workers=1, progress=False)
    index = Index.build(tmp_path / "a", kind="flat", save=False, use_gpu=False)
    query = index.embeddings()[:1]
    for k in (1, 3, 10, 299, 300, 301):
        hits = index.search(query, k=k)[0]
        assert [h.position for h in hits] == list(range(k)), k
        assert len({h.score for h in hits[:min(k, 300)]}) == 1


# ---------------------------------------------------------------------------------------------- damaged files
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_index_json_is_a_typed_error(copies: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = _copy(copies, tmp_path / "a")
    for text in ("{garbage", "[1, 2]", "\xff\xfe"):
        (out / "index.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(ArchiveFormatError) as info:
            Index.load(out)
        assert info.value.path == str(out / "index.json") and "wave-rt index" in str(info.value)
    assert run(["search", str(out), "--text", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wave-rt search: error: ") and str(out / "index.json") in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_damaged_saved_faiss_index_is_a_typed_error(copies: Path, tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="needs faiss: pip install faiss-cpu")
    out = _copy(copies, tmp_path / "a")
    Index.build(out, kind="hnsw")
    file = out / "index-hnsw.faiss"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ArchiveFormatError) as info:
        Index.load(out)
    assert info.value.path == str(file) and "rebuild" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbled footer"])
def test_damaged_shard_is_a_typed_error_for_search_and_embed(copies: Path, tmp_path: Path, damage: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = _copy(copies, tmp_path / "a")
    shard = out / "part-00001.parquet"
    data = shard.read_bytes()
    # a garbled footer is reported by pyarrow as a bare OSError, a truncation as ArrowInvalid
    shard.write_bytes(data[:500] if damage == "truncated" else data[:-200] + bytes(range(192)) + data[-8:])
    with pytest.raises(ArchiveFormatError) as info:
        Index.load(out)
    assert info.value.path == str(shard) and "damaged shard" in str(info.value)
    with pytest.raises(ArchiveFormatError) as info:  # resuming reads every committed shard
        embed_archive(copies.parent / "m.jsonl", out, model=FakeEncoder(dim=DIM), workers=1, progress=False)
    assert info.value.path == str(shard)
    assert run(["search", str(out), "--text", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wave-rt search: error: ") and str(shard) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_shard_is_not_reported_as_damaged(copies: Path, tmp_path: Path) -> None:
    """An OS error (here: the file is gone) is not the file's fault: it stays an OSError."""
    from wave_rt.archive.shards import read_ids, shard_rows

    for read in (read_ids, shard_rows):
        with pytest.raises(OSError) as info:
            read(tmp_path / "part-00000.parquet")
        assert not isinstance(info.value, ArchiveFormatError)


def test_nlist_above_the_row_count(copies: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("faiss", reason="needs faiss: pip install faiss-cpu")
    out = _copy(copies, tmp_path / "a")
    with pytest.raises(IndexOptionsError, match=r"nlist=1000: must be between 1 and the number of rows \(40\)"):
        Index.build(out, kind="ivf", nlist=1000)
    with pytest.raises(IndexOptionsError, match="nlist=0"):
        Index.build(out, kind="ivf", nlist=0)
    assert Index.build(out, kind="ivf", nlist=40, save=False).params["nlist"] == 40
    assert run(["index", str(out), "--kind", "ivf", "--nlist", "1000"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"wave-rt index: error: {out}: nlist=1000: must be between 1 and the number of rows "
                           "(40): IVF trains one centroid per list")


# ---------------------------------------------------------------------------------------------- no faiss
def _saved_hnsw(out: Path) -> None:
    """index.json + index-hnsw.faiss as `wave-rt index --kind hnsw` leaves them; the file's bytes are never
    read without faiss, so no faiss is needed to make them."""
    from wave_rt.archive.journal import committed_shards
    from wave_rt.archive.manifest import read_manifest

    shards = committed_shards(out)
    info = {"kind": "hnsw", "rows": sum(s.rows for s in shards), "shards": [[s.name, s.rows] for s in shards],
            "config_hash": read_manifest(out).config_hash, "params": {"efSearch": 64}}
    (out / "index.json").write_text(json.dumps(info))
    (out / "index-hnsw.faiss").write_bytes(b"not read")


def test_saved_ann_index_without_faiss_searches_exactly(copies: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    out = _copy(copies, tmp_path / "a")
    _saved_hnsw(out)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss fails, find_spec finds nothing
    with caplog.at_level(logging.WARNING, logger="wave_rt.archive.index"):
        index = Index.load(out)
    assert index.kind == "flat-gpu" and len(index) == 40
    [record] = [r for r in caplog.records if "index-hnsw.faiss" in r.getMessage()]
    assert "faiss is not installed" in record.getMessage() and "pip install faiss-cpu" in record.getMessage()
    hits = index.search_items("text 3", k=COPIES, encoder=FakeEncoder(dim=DIM))[0]
    assert len(hits) == COPIES and all(h.score == pytest.approx(1.0, abs=1e-5) for h in hits)
    with pytest.raises(MissingDependencyError, match="pip install faiss-cpu"):  # asked for by name: no fallback
        Index.load(out, kind="hnsw")


# ---------------------------------------------------------------------------------------------- other model
@pytest.fixture(scope="module")
def demo_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "archive"
    assert run(["embed", "demo", "--out", str(out), "--no-progress"]) == 0
    return out


def test_search_cli_without_faiss_uses_saved_ann_index_exactly(demo_archive: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    out = _copy(demo_archive, tmp_path / "a")
    _saved_hnsw(out)
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert run(["search", str(out), "--text", "three short electronic beeps", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "text/beeps"
    # (the CLI's stderr handler is pytest's log capture here)
    assert any("skipping the saved hnsw index" in r.getMessage() and "pip install faiss-cpu" in r.getMessage()
               for r in caplog.records)


def test_search_cli_dtype_mismatch_names_dtype_and_search_advice(demo_archive: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert run(["search", str(demo_archive), "--text", "hi", "--dtype", "bf16"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("wave-rt search: error: ")
    assert "dtype: the directory has 'float32', the query encoder would use 'bfloat16'" in err
    assert "config_hash" not in err and "--out" not in err and "delete" not in err
    assert "'wave_rt-demo'" in err and "--dtype float32" in err


class _OtherEncoder(FakeEncoder):
    model_id = "another-model"
    fingerprint = "0ther0ther0ther0"


def test_query_encoder_mismatch_names_fields(copies: Path) -> None:
    index = Index.load(copies)
    other_dtype = FakeEncoder(dim=DIM)
    other_dtype.dtype = torch.bfloat16
    other_dtype.fingerprint = "bf16bf16bf16bf16"
    with pytest.raises(SearchMismatchError) as info:
        index.search_items("x", encoder=other_dtype)
    assert list(info.value.differences) == ["dtype"]
    assert isinstance(info.value, ArchiveMismatchError) and "choose another --out" not in str(info.value)
    with pytest.raises(SearchMismatchError) as info:
        index.search_items("x", encoder=_OtherEncoder(dim=DIM))
    assert info.value.differences == {"model_id": ("fake-encoder", "another-model")}
    retrained = FakeEncoder(dim=DIM)
    retrained.fingerprint = "retrained0000000"  # same name and dtype, other weights
    with pytest.raises(SearchMismatchError) as info:
        index.search_items("x", encoder=retrained)
    assert list(info.value.differences) == ["config_hash"]


def test_embed_mismatch_advice_is_unchanged(tmp_path: Path) -> None:
    from wave_rt.archive.manifest import RunManifest, check_compatible

    m = RunManifest(model_id="m", model_path="demo", config_hash="a", dtype="float32", dim=4, instruction=None,
                    modality="auto", embedding_dtype="float32", normalized=True, wave_rt_version="0")
    other = RunManifest(**{**m.__dict__, "dtype": "bfloat16"})
    with pytest.raises(ArchiveMismatchError) as info:
        check_compatible(tmp_path, m, other)
    assert not isinstance(info.value, SearchMismatchError)
    assert "this run would use 'bfloat16'" in str(info.value)
    assert str(info.value).endswith("choose another --out directory, or delete this one to start over.")
