"""End to end with the bundled tiny model on real files made in-process (numpy, soundfile, PyAV): every good item
once, every bad item in errors.jsonl with its reason, vectors equal to encode() of the same items."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import (
    BAD_MEDIA,
    GOOD_MEDIA,
    make_media_archive,
    read_archive,
    read_error_ids,
)
from archive_helpers import write_text_manifest as write_manifest_file

import wave_rt
from wave_rt.archive.errors import ArchiveMismatchError, SourceError
from wave_rt.archive.job import embed_archive
from wave_rt.cli import run

TOL = 1e-5


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_media_archive(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def encoder() -> wave_rt.WaveEncoder:
    return wave_rt.WaveEncoder.from_pretrained(None, device="cpu")


def _item(path: Path, modality: str):  # noqa: ANN202
    return {"audio": wave_rt.Audio, "video": wave_rt.Video, "av": wave_rt.AudioVisual}[modality](str(path))


@pytest.fixture(scope="module")
def dir_run(media: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("out") / "archive"
    summary = embed_archive(media, out, model=None, device="cpu", workers=2, progress=False)
    return out, summary


def test_archive_e2e_directory_rows_errors_and_vectors(dir_run, media: Path, encoder) -> None:  # noqa: ANN001
    out, summary = dir_run
    rows = read_archive(out)
    assert set(rows) == set(GOOD_MEDIA)  # hidden folder and notes.txt are not media of the walk
    assert summary.embedded == len(GOOD_MEDIA) and summary.failed == len(BAD_MEDIA) and summary.complete
    for item_id, modality in GOOD_MEDIA.items():
        assert rows[item_id]["modality"] == modality, item_id
        assert rows[item_id]["path"] == str((media / item_id).resolve())
        assert rows[item_id]["duration"] and rows[item_id]["duration"] > 0.5
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted(BAD_MEDIA)
    by_id = {e["id"]: e for e in errors}
    assert by_id["bad/empty.flac"]["error"] == "EmptyMediaError" and "empty" in by_id["bad/empty.flac"]["message"]
    assert by_id["bad/truncated.wav"]["error"] == "TruncatedMediaError"
    assert by_id["bad/broken.mp4"]["error"] == "CorruptMediaError"
    assert by_id["bad/notaudio.ogg"]["error"] == "CorruptMediaError"
    for e in errors:
        assert e["stage"] == "decode" and e["retryable"] is False and e["path"].endswith(e["id"])

    ids = sorted(GOOD_MEDIA)
    expected = encoder.encode([_item(media / i, GOOD_MEDIA[i]) for i in ids])
    got = np.stack([rows[i]["embedding"] for i in ids])
    assert np.abs(got - expected).max() <= TOL
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_hash"] == encoder.fingerprint and manifest["dim"] == encoder.dim
    assert manifest["model_id"] == encoder.model_id and manifest["model_path"] == "demo"
    assert manifest["dtype"] == "float32" and manifest["status"] == "complete"
    assert manifest["rows"] == len(GOOD_MEDIA) and manifest["errors"] == len(BAD_MEDIA)
    assert manifest["wave_rt_version"] == wave_rt.__version__
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert sum(j["rows"] for j in journal) == len(GOOD_MEDIA)


def test_archive_e2e_rerun_does_nothing(dir_run, media: Path) -> None:  # noqa: ANN001
    out, _ = dir_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("part-")}
    errors_before = (out / "errors.jsonl").read_text()
    again = embed_archive(media, out, model=None, device="cpu", progress=False)
    assert again.nothing_to_do and again.embedded == 0 and again.failed == 0
    assert again.already_done == len(GOOD_MEDIA) + len(BAD_MEDIA)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("part-")} == before
    assert (out / "errors.jsonl").read_text() == errors_before
    assert "nothing to do" in again.table()


def test_archive_e2e_refuses_other_settings(dir_run, media: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out, _ = dir_run
    with pytest.raises(ArchiveMismatchError, match="instruction"):
        embed_archive(media, out, instruction="Describe the sound.", progress=False)
    with pytest.raises(ArchiveMismatchError, match="dtype"):
        embed_archive(media, out, dtype="fp16", progress=False)
    with pytest.raises(ArchiveMismatchError, match="modality"):
        embed_archive(media, out, modality="audio", progress=False)
    from tiny_checkpoints import make_tiny_checkpoint

    other = tmp_path / "other-model"
    make_tiny_checkpoint(other, recipe="all_layer", use_beats=True, seed=99)
    with pytest.raises(ArchiveMismatchError, match="config_hash") as info:
        embed_archive(media, out, model=other, device="cpu", progress=False)
    assert "choose another --out" in str(info.value)


def test_archive_e2e_cli_codes(dir_run, media: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    out, _ = dir_run
    assert run(["embed", str(media), "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run(["embed", str(media), "--out", str(out), "--instruction", "x", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "different settings" in err and "instruction" in err and "Traceback" not in err
    assert run(["embed", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert run(["embed", str(media)]) == 1  # --out missing: usage error, one line
    assert run(["embed", str(media), "--out", str(tmp_path / "o"), "--modality", "smell"]) == 1


def test_archive_e2e_manifest_texts_and_media(media: Path, encoder, tmp_path: Path) -> None:  # noqa: ANN001
    manifest = tmp_path / "items.jsonl"
    expect = write_manifest_file(manifest, media)
    out = tmp_path / "out"
    summary = embed_archive(manifest, out, model=encoder, workers=1, progress=False, shard_rows=3)
    rows = read_archive(out)
    assert set(rows) == expect["good"]
    err_ids = read_error_ids(out)
    assert sorted(err_ids) == sorted(expect["bad"] | expect["duplicates"])  # each once
    assert summary.embedded == len(expect["good"])
    assert len(list(out.glob("part-*.parquet"))) == -(-len(expect["good"]) // 3)

    from archive_helpers import TEXTS

    text_ids = [f"t{i}" if i % 2 == 0 else f"text:{i}" for i in range(len(TEXTS))]
    got = np.stack([rows[i]["embedding"] for i in text_ids])
    assert np.abs(got - encoder.encode(list(TEXTS))).max() <= TOL
    assert rows["t0"]["text"] == TEXTS[0] and rows["t0"]["modality"] == "text" and rows["t0"]["path"] is None
    video = encoder.encode(wave_rt.Video(str(media / "video/clip.mp4")))
    assert rows["clip-video-only"]["modality"] == "video"
    assert np.abs(rows["clip-video-only"]["embedding"] - video).max() <= TOL
    steered = encoder.encode(wave_rt.Audio(str(media / "speech/hello.wav")), instruction="What is being said?")
    assert np.abs(rows["speech-steered"]["embedding"] - steered).max() <= TOL
    assert rows["speech-steered"]["instruction"] == "What is being said?"
    assert rows["speech-steered"]["text"] == "caption kept as metadata"
    plain = encoder.encode(wave_rt.Audio(str(media / "speech/hello.wav")))
    assert np.abs(steered - plain).max() > 1e-4  # the instruction really reached the model

    # resume after deleting one shard (as if it had never been committed): only its rows come back
    lost = sorted(out.glob("part-*.parquet"))[0]
    import pyarrow.parquet as pq

    lost_ids = set(pq.read_table(lost, columns=["id"]).column("id").to_pylist())
    lost.unlink()
    again = embed_archive(manifest, out, model=encoder, workers=1, progress=False, shard_rows=3)
    assert again.embedded == len(lost_ids) and again.failed == 0
    assert set(read_archive(out)) == expect["good"]
    assert sorted(read_error_ids(out)) == sorted(expect["bad"] | expect["duplicates"])


def test_archive_e2e_incremental_and_float16(media: Path, encoder, tmp_path: Path) -> None:  # noqa: ANN001
    src = tmp_path / "src"
    shutil.copytree(media / "tones", src)
    out = tmp_path / "out"
    first = embed_archive(src, out, model=encoder, embedding_dtype="float16", progress=False)
    assert first.embedded == 4
    shutil.copy(media / "speech/hello.wav", src / "new.wav")
    second = embed_archive(src, out, model=encoder, embedding_dtype="float16", progress=False)
    assert second.embedded == 1 and second.already_done == 4
    import pyarrow.parquet as pq

    rows = read_archive(out)
    assert set(rows) == {"tone.flac", "noise.ogg", "deep/beep.wav", "sine.m4a", "new.wav"}
    import pyarrow as pa

    emb_type = pq.read_schema(sorted(out.glob("part-*.parquet"))[0]).field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 64
    assert emb_type.value_type == pa.float16()
    ref = encoder.encode(wave_rt.Audio(str(src / "new.wav")))
    assert np.abs(rows["new.wav"]["embedding"] - ref).max() <= 1e-3  # float16 storage
    with pytest.raises(ArchiveMismatchError, match="embedding_dtype"):
        embed_archive(src, out, model=encoder, progress=False)


def test_archive_e2e_empty_source_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no items"):
        embed_archive(tmp_path / "empty", tmp_path / "out", progress=False)
