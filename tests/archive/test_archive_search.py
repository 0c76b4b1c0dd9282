"""Search over an archive: every item's own vector ranks itself first (flat, IVF, HNSW), text / audio / video
queries through `wave-rt index` + `wave-rt search` and through `wave_rt.Index` on the demo archive, the
README's search finds its clip with the trained demo model, saved indexes reload, and a stale saved index is
not used."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import FakeEncoder, read_archive
from tiny_checkpoints import make_tiny_checkpoint

import wave_rt
from wave_rt.archive.demo_data import CAPTIONS, demo_dir
from wave_rt.archive.errors import ArchiveFormatError
from wave_rt.archive.index import Index
from wave_rt.archive.job import embed_archive
from wave_rt.cli import run

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


# ------------------------------------------------------------------------------------------------ flat-gpu
class TieEncoder(FakeEncoder):
    """Unit vectors with four entries of +-0.5: every dot product is a multiple of 1/4, exact in any
    summation order, so equal scores are equal bit for bit on every backend (real ties, not rounding)."""

    def _vector(self, key: str) -> np.ndarray:
        rng = np.random.default_rng(int.from_bytes(key.encode()[-8:].rjust(8, b"0"), "little"))
        v = np.zeros(self.dim, np.float32)
        v[rng.choice(self.dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return v


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 rows of 200 distinct texts (copies under distinct ids) with exact scores: ties everywhere."""
    root = tmp_path_factory.mktemp("tied")
    rng = np.random.default_rng(5)
    with open(root / "m.jsonl", "w", encoding="utf-8") as f:
        for i in range(600):
            f.write(json.dumps({"id": f"row{i:04d}", "text": f"phrase {int(rng.integers(0, 200)):03d}"}) + "\n")
    out = root / "archive"
    embed_archive(root / "m.jsonl", out, model=TieEncoder(dim=DIM), workers=1, shard_rows=250, progress=False)
    return out


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_archive_search_flat_gpu_equals_faiss_flat(synthetic: Path, tied: Path, tmp_path: Path, backend: str) -> None:
    """Index(kind="flat-gpu") on the CPU fallback (the kernels' torch path, and the Triton kernel in the
    interpreter) returns what FAISS flat returns: the same scores to fp32 rounding, the same rows in the
    same order where scores are distinct; on exact ties the lower row first, as FAISS flat through Index."""
    from wave_rt.kernels import _dispatch as dispatch

    for archive in (synthetic, tied):
        faiss_flat = Index.build(archive, kind="flat", save=False)
        ours = Index.build(archive, kind="flat-gpu", save=False)
        assert ours.kind == "flat-gpu" and len(ours) == len(faiss_flat)
        vectors = ours.embeddings()
        queries = vectors[::97] if archive == tied else \
            np.concatenate([vectors[::97], np.random.default_rng(0).standard_normal((5, DIM))])
        with dispatch.force_backend(backend):
            got = ours.search(queries, k=9)
        want = faiss_flat.search(queries, k=9)
        for g, w in zip(got, want):
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=0, atol=2e-6)
            if archive == synthetic:  # no ties: the same rows in the same order
                assert [(h.position, h.id) for h in g] == [(h.position, h.id) for h in w]
        # Ties (exact in the tied archive): both exact kinds return tied rows by lower row, i.e. the stable
        # float64 ranking (FAISS flat's own heap order is re-sorted by Index.search).
        exact = vectors.astype(np.float64) @ queries.astype(np.float64).T
        for j, (hits, faiss_hits) in enumerate(zip(got, want)):
            stable = np.argsort(-exact[:, j], kind="stable")[:9].tolist()
            assert [h.position for h in hits] == stable and [h.position for h in faiss_hits] == stable


@pytest.mark.gpu
def test_archive_search_flat_gpu_on_cuda(synthetic: Path, tied: Path) -> None:
    """On CUDA: fp16 vectors in GPU memory, the compiled kernel. Self-retrieval and FAISS's top-k on random
    rows (scores to fp16 rounding), and exact tie order on the exactly representable tied archive."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ours = Index.build(synthetic, kind="flat-gpu", save=False)
    assert ours.index.device.type == "cuda" and ours.index.resident and ours.index.dtype == torch.float16
    vectors = ours.embeddings()
    queries = vectors[::31]
    got = ours.search(queries, k=9)
    want = Index.build(synthetic, kind="flat", save=False, use_gpu=False).search(queries, k=9)
    assert [h[0].position for h in got] == list(range(0, len(vectors), 31))
    recall = np.mean([len({x.position for x in g} & {x.position for x in w}) / 9 for g, w in zip(got, want)])
    assert recall >= 0.97, recall
    np.testing.assert_allclose([[h.score for h in g] for g in got], [[h.score for h in w] for w in want],
                               rtol=0, atol=3e-3)
    tied_index = Index.build(tied, kind="flat-gpu", save=False)
    tv = tied_index.embeddings()
    exact = tv.astype(np.float64) @ tv[::7].astype(np.float64).T
    for j, hits in enumerate(tied_index.search(tv[::7], k=12)):
        assert [h.position for h in hits] == np.argsort(-exact[:, j], kind="stable")[:12].tolist()


def test_archive_search_flat_gpu_cli(tied: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`wave-rt index` picks flat-gpu where exact_kind() says CUDA (patched here); it saves only index.json,
    and a later load (the path `wave-rt search` takes) searches with it; --cpu keeps FAISS flat."""
    import shutil

    import wave_rt.archive.index as index_mod

    out = tmp_path / "archive"
    shutil.copytree(tied, out)
    monkeypatch.setattr(index_mod, "exact_kind", lambda: "flat-gpu")
    assert run(["index", str(out)]) == 0
    assert "(flat-gpu, dim 32)" in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text())["kind"] == "flat-gpu"
    assert not list(out.glob("index-*.faiss"))
    loaded = Index.load(out)
    assert loaded.kind == "flat-gpu" and len(loaded) == 600
    row = read_archive(out)["row0123"]["embedding"]
    assert loaded.search(row, k=1)[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert Index.load(out, kind="flat-gpu").kind == "flat-gpu"
    monkeypatch.setattr(index_mod, "exact_kind", lambda: "flat")  # the same archive on a machine without CUDA
    assert Index.load(out).kind == "flat"
    monkeypatch.setattr(index_mod, "exact_kind", lambda: "flat-gpu")
    assert run(["index", str(out), "--cpu"]) == 0
    assert (out / "index-flat.faiss").exists()
    assert Index.load(out).kind == "flat-gpu"  # a saved exact FAISS index is searched on the GPU kind
    monkeypatch.setattr(index_mod, "exact_kind", lambda: "flat")
    assert Index.load(out).kind == "flat"


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
    from wave_rt.archive.index import exact_kind

    assert run(["index", str(demo_archive)]) == 0
    assert "indexed 16 rows" in capsys.readouterr().out
    kind = json.loads((demo_archive / "index.json").read_text())["kind"]
    assert kind == exact_kind()  # flat-gpu on a CUDA machine, FAISS flat elsewhere
    assert kind == "flat-gpu" or (demo_archive / "index-flat.faiss").exists()

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


def _readme_main_command() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- main-command -->\s*```\n(.*?)\n```\s*<!-- /main-command -->", readme, re.S)
    assert block is not None, "README.md has no main-command block"
    return block.group(1).strip()


@pytest.mark.parametrize("faiss_installed", [True, False])
def test_archive_search_readme_query_finds_its_clip(demo_archive: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch, faiss_installed: bool) -> None:
    """The README's main command ends with `wave-rt search wave_rt_demo_out --text "..."`: on the demo archive
    (embedded through the CLI, bundled trained demo model) that text returns video/red_circle_left.mp4 first,
    ahead of the clips that differ from it in one attribute (direction, colour, shape). The main command installs
    no extras, so the search must also work where faiss is not installed (the exact torch index)."""
    if not faiss_installed:
        import sys

        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss fails, find_spec finds nothing
    command = _readme_main_command()
    steps = [shlex.split(part) for part in command.split(" && ")]
    assert steps[1][:4] == ["wave-rt", "embed", "demo", "--out"]
    search = steps[-1]
    assert search[:3] == ["wave-rt", "search", steps[1][4]] and search[3] == "--text", command
    query = search[4]
    assert query == "a red circle moving to the left"
    hits = _cli_json(["search", str(demo_archive), "--text", query, "-k", "16", "--json"], capsys)
    ids = [h["id"] for h in hits]
    assert ids[0] == "video/red_circle_left.mp4", hits[:4]
    assert hits[0]["modality"] == "video"
    for near_miss in ("video/red_circle_right.mp4", "video/blue_circle_left.mp4", "video/red_bar_left.mp4"):
        assert near_miss in ids[1:]


def test_archive_search_demo_python(demo_archive: Path) -> None:
    index = wave_rt.Index.build(demo_archive, kind="hnsw")
    assert len(index) == 16
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
    assert len(err.strip().splitlines()) == 1 and "dtype: the directory has 'float32'" in err
    other = make_tiny_checkpoint(tmp_path / "other", seed=99)
    assert run(["search", str(demo_archive), "--text", caption, "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model_id: the directory has 'wave_rt-demo'" in err
