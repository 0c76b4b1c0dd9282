"""Search over an archive: every item's own vector ranks itself first (flat, IVF, HNSW), text / audio / video
queries through `wave-rt index` + `wave-rt search` and through `wave_rt.Index` on the demo archive, saved
indexes reload, and a stale saved index is not used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import FakeEncoder, read_archive

import wave_rt
from wave_rt.archive.demo_data import CAPTIONS, demo_dir
from wave_rt.archive.errors import ArchiveFormatError
from wave_rt.archive.index import Index
from wave_rt.archive.job import embed_archive
from wave_rt.cli import run
from wave_rt.model.tiny import make_tiny_checkpoint

pytest.importorskip("faiss", reason="needs faiss: pip install faiss-cpu")

DIM = 32


def _manifest(path: Path, start: int, n: int) -> Path:
    with open(path, "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"doc{i:05d}", "text": f"document {i} " + "w" * (i % 23)}) + "\n")
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 rows of hash vectors (FakeEncoder) in several shards: large enough for IVF lists to matter."""
    root = tmp_path_factory.mktemp("synthetic")
    out = root / "archive"
    summary = embed_archive(_manifest(root / "m.jsonl", 0, 3000), out, model=FakeEncoder(dim=DIM), workers=1,
                            shard_rows=700, progress=False)
    assert summary.embedded == 3000 and len(list(out.glob("part-*.parquet"))) == 5
    return out


def _self_rank_first(index: Index) -> float:
    """Fraction of rows whose own vector, as a query, returns that row first."""
    vectors = index.embeddings()
    hits = index.search(vectors, k=3)
    return float(np.mean([h[0].position == i for i, h in enumerate(hits)]))


def test_archive_search_self_is_first_flat_ivf_hnsw(synthetic: Path) -> None:
    rows = read_archive(synthetic)
    flat = Index.build(synthetic, kind="flat")
    assert len(flat) == 3000 and flat.dim == DIM
    assert _self_rank_first(flat) == 1.0
    hits = flat.search(rows["doc00042"]["embedding"], k=5)[0]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0].id == "doc00042" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].modality == "text" and hits[0].text == "document 42 " + "w" * (42 % 23) and hits[0].path is None
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # exact: the ranking equals a brute-force cosine ranking in float64
    ids = sorted(rows)
    mat = np.stack([rows[i]["embedding"] for i in ids]).astype(np.float64)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    q = mat[ids.index("doc00042")]
    brute = [ids[j] for j in np.argsort(-(mat @ q), kind="stable")[:5]]
    assert [h.id for h in hits] == brute

    # IVF: a row sits in the list of its nearest centroid, which is the first list its own vector probes,
    # so self-retrieval is exact even though other neighbours are approximate
    ivf = Index.build(synthetic, kind="ivf")
    assert ivf.params["nlist"] > 8 and ivf.params["nprobe"] < ivf.params["nlist"]  # really approximate
    assert _self_rank_first(ivf) == 1.0
    hnsw = Index.build(synthetic, kind="hnsw")
    frac = _self_rank_first(hnsw)
    print(f"HNSW self-retrieval: {frac:.4f}")
    assert frac >= 0.995  # a graph search is approximate; on 3,000 random 32-d vectors it misses ~never

    # the saved index is the last built one (hnsw); loading gives it back with its search parameters
    loaded = Index.load(synthetic)
    assert loaded.kind == "hnsw" and len(loaded) == 3000 and loaded.params["efSearch"] == 64
    assert (synthetic / "index-hnsw.faiss").exists() and (synthetic / "index-ivf.faiss").exists()
    assert _self_rank_first(loaded) >= 0.995
    # search by item with the archive's own encoder
    enc = FakeEncoder(dim=DIM)
    found = loaded.search_items(["document 7 " + "w" * 7, "document 2999 " + "w" * (2999 % 23)], k=2, encoder=enc)
    assert [h[0].id for h in found] == ["doc00007", "doc02999"]


def test_archive_search_stale_index_is_not_used(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "archive"
    shutil.copytree(synthetic, out)
    Index.build(out, kind="ivf")
    manifest = _manifest(tmp_path / "m.jsonl", 0, 3100)  # 100 more rows than the archive holds
    more = embed_archive(manifest, out, model=FakeEncoder(dim=DIM), workers=1, shard_rows=700, progress=False)
    assert more.embedded == 100
    index = Index.load(out)  # index.json lists the old shards: an exact in-memory index instead, nothing saved
    assert index.kind == "flat" and len(index) == 3100
    assert json.loads((out / "index.json").read_text())["kind"] == "ivf"
    assert index.search(read_archive(out)["doc03050"]["embedding"], k=1)[0][0].id == "doc03050"
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.ones(DIM, np.float32), k=0)
    with pytest.raises(ValueError, match="queries must be"):
        index.search(np.ones(DIM + 1, np.float32))
    with pytest.raises(ArchiveFormatError, match="no manifest"):
        Index.build(tmp_path)


# ---------------------------------------------------------------------------------------------- demo archive
@pytest.fixture(scope="module")
def demo_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "archive"
    assert run(["embed", "demo", "--out", str(out), "--no-progress"]) == 0
    return out


def _cli_json(args: list[str], capsys: pytest.CaptureFixture) -> list[dict]:
    assert run(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_archive_search_demo_cli(demo_archive: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(["index", str(demo_archive)]) == 0
    assert "indexed 12 rows" in capsys.readouterr().out
    assert (demo_archive / "index-flat.faiss").exists()

    caption = CAPTIONS["text/beeps"]
    hits = _cli_json(["search", str(demo_archive), "--text", caption, "-k", "3", "--json"], capsys)
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["id"] == "text/beeps" and hits[0]["text"] == caption and hits[0]["score"] > 0.9999
    assert hits[1]["score"] < 0.9999  # the untrained demo model does not map other captions onto it

    media = demo_dir()
    for flag, rel in (("--audio", "audio/chirp.flac"), ("--video", "video/square.webm"), ("--av", "video/ball.mp4")):
        hits = _cli_json(["search", str(demo_archive), flag, str(media / rel), "-k", "2", "--json"], capsys)
        assert hits[0]["id"] == rel and hits[0]["score"] > 0.9999, (flag, hits)

    assert run(["search", str(demo_archive), "--text", "a tone", "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "score", "modality", "id"] and len(table.splitlines()) == 3

    assert run(["search", str(demo_archive), "--text", "x", "-k", "0"]) == 1
    assert "-k must be positive" in capsys.readouterr().err
    assert run(["search", str(demo_archive / "nope"), "--text", "x"]) == 1
    assert "not an archive directory" in capsys.readouterr().err
    assert run(["search", str(demo_archive), "--audio", str(media / "missing.wav")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_archive_search_demo_python(demo_archive: Path) -> None:
    index = wave_rt.Index.build(demo_archive, kind="hnsw")
    assert len(index) == 12
    assert _self_rank_first(index) == 1.0
    queries = list(CAPTIONS)
    hits = index.search_items([CAPTIONS[q] for q in queries], k=12)
    assert [h[0].id for h in hits] == queries
    assert all(h[0].score > 0.9999 and len(h) == 12 for h in hits)
    audio = index.search_items(wave_rt.Audio(str(demo_dir() / "audio/tone_a440.wav")), k=1)[0][0]
    assert audio.id == "audio/tone_a440.wav" and audio.modality == "audio" and audio.duration > 1.0
    # an instruction turns plain strings into queries (the fusion head): a different vector, still searchable
    steered = index.search_items("a tone", k=3, instruction="Find the matching sound.")[0]
    plain = index.search_items("a tone", k=3)[0]
    assert len(steered) == 3 and abs(steered[0].score - plain[0].score) > 1e-6


def test_archive_search_model_options(demo_archive: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """--model points at a moved checkpoint of the same model; --dtype must be the archive's; a different
    model or dtype is refused with a one-line error (the fingerprint check), not a silently wrong search."""
    caption = CAPTIONS["text/beeps"]
    hits = _cli_json(["search", str(demo_archive), "--text", caption, "-k", "1", "--json", "--model", "demo",
                      "--dtype", "fp32", "--device", "cpu"], capsys)
    assert hits[0]["id"] == "text/beeps"
    assert run(["search", str(demo_archive), "--text", caption, "--dtype", "bf16"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config_hash" in err
    other = make_tiny_checkpoint(tmp_path / "other", seed=99)
    assert run(["search", str(demo_archive), "--text", caption, "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config_hash" in err
