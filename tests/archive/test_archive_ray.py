"""`--engine ray` on a local 2-worker Ray cluster (CPU): the same rows, errors and resume semantics as local."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from archive_helpers import (
    make_media_archive,
    read_archive,
    read_error_ids,
    write_text_manifest,
)

ray = pytest.importorskip("ray", reason='needs ray: pip install "ray[data]"')


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass
    yield ray
    ray.shutdown()


def _shard_ids(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def test_archive_ray_same_rows_as_local(local_ray, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from wave_rt.archive.job import embed_archive
    from wave_rt.cli import run

    media = make_media_archive(tmp_path / "media")
    manifest = tmp_path / "items.jsonl"
    expect = write_text_manifest(manifest, media)
    # text rows, forced modalities and a per-row instruction from the helper, plus files of each kind
    extra = ("tones/tone.flac", "video/silent.webm", "video/clip.mp4", "bad/broken.mp4")
    with open(manifest, "a") as f:
        for rel in extra:
            f.write(f'{{"id": "{rel}", "path": "{media / rel}"}}\n')

    local = embed_archive(manifest, tmp_path / "local", model=None, device="cpu", workers=1, progress=False)
    dist = embed_archive(manifest, tmp_path / "ray", model=None, engine="ray", workers=2, progress=False,
                         shard_rows=4)
    assert dist.complete and not dist.interrupted
    assert dist.embedded == local.embedded and dist.failed == local.failed
    assert dist.workers == 2  # both actors got a share of the work list
    a, b = read_archive(tmp_path / "local"), read_archive(tmp_path / "ray")
    assert set(a) == set(b) == expect["good"] | {"tones/tone.flac", "video/silent.webm", "video/clip.mp4"}
    worst = max(float(np.abs(a[i]["embedding"] - b[i]["embedding"]).max()) for i in a)
    assert worst <= 1e-5
    for i in a:
        assert {k: v for k, v in a[i].items() if k != "embedding"} == {k: v for k, v in b[i].items() if k != "embedding"}
    assert sorted(read_error_ids(tmp_path / "local")) == sorted(read_error_ids(tmp_path / "ray"))
    assert not (tmp_path / "ray" / ".worklist").exists()

    # Resume. The journal's contract (journal.py): a shard it lists that is missing on disk is dropped from
    # the journal and its items count as not done, so the next run embeds exactly those again. Through the
    # CLI this time, with the Ray engine and 2 workers.
    shards = sorted((tmp_path / "ray").glob("part-*.parquet"))
    assert len(shards) >= 3
    lost_ids = _shard_ids(shards[1])
    shards[1].unlink()
    errors_before = (tmp_path / "ray" / "errors.jsonl").read_text()
    code = run(["embed", str(manifest), "--out", str(tmp_path / "ray"), "--engine", "ray", "--replicas", "2",
                "--shard-rows", "4", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"{len(lost_ids)} items this run" in printed and "Ray worker(s)" in printed
    c = read_archive(tmp_path / "ray")
    assert set(c) == set(a)
    new_shards = set(p.name for p in (tmp_path / "ray").glob("part-*.parquet")) - {p.name for p in shards}
    assert set().union(*(_shard_ids(tmp_path / "ray" / n) for n in new_shards)) == lost_ids
    assert max(float(np.abs(a[i]["embedding"] - c[i]["embedding"]).max()) for i in lost_ids) <= 1e-5
    assert (tmp_path / "ray" / "errors.jsonl").read_text() == errors_before  # failures are not retried
    assert embed_archive(manifest, tmp_path / "ray", model=None, engine="ray", progress=False).nothing_to_do


def test_archive_ray_refuses_an_encoder_object(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    from archive_helpers import FakeEncoder

    from wave_rt.archive.job import embed_archive

    (tmp_path / "m.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="checkpoint path"):
        embed_archive(tmp_path / "m.jsonl", tmp_path / "out", model=FakeEncoder(), engine="ray", progress=False)


def test_archive_ray_non_utf8_file_names(local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    """The work list carries paths as bytes, so a file whose name is not UTF-8 reaches a Ray worker, opens, and is
    recorded like the local engine records it (escaped id and path); a broken one is its item's error. The work
    list used to be refused by Arrow: the whole job failed."""
    import os

    import soundfile as sf
    from media_factory import tone

    from wave_rt.archive.job import embed_archive
    from wave_rt.archive.journal import read_errors

    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "a.wav", tone(0.6, 440, 16000), 16000, subtype="PCM_16")
    sf.write(src / "latin.wav", tone(0.8, 330, 16000), 16000, subtype="PCM_16")
    os.rename(os.fsencode(src) + b"/latin.wav", os.fsencode(src) + b"/caf\xe9.wav")  # soundfile wants UTF-8 names
    with open(os.fsencode(src) + b"/bad\xff.wav", "wb") as f:
        f.write(b"not a wav")
    local = embed_archive(src, tmp_path / "local", model=None, device="cpu", workers=1, progress=False)
    dist = embed_archive(src, tmp_path / "ray", model=None, engine="ray", workers=2, progress=False)
    assert dist.complete and (dist.embedded, dist.failed) == (local.embedded, local.failed) == (2, 1)
    a, b = read_archive(tmp_path / "local"), read_archive(tmp_path / "ray")
    assert set(a) == set(b) == {"a.wav", "caf\\xe9.wav"}
    assert b["caf\\xe9.wav"]["path"] == str(src / "caf\\xe9.wav")
    assert float(np.abs(a["caf\\xe9.wav"]["embedding"] - b["caf\\xe9.wav"]["embedding"]).max()) <= 1e-5
    assert [(e["id"], e["path"]) for e in read_errors(tmp_path / "ray")] == [("bad\\xff.wav", str(src / "bad\\xff.wav"))]


def test_an_actor_refuses_a_model_other_than_the_drivers(tmp_path: Path) -> None:
    # a stale copy on one node at the same path: its vectors would be mixed into the archive silently
    from wave_rt.archive.options import JobOptions
    from wave_rt.archive.ray_engine import EmbedActor
    from wave_rt.embed.encoder import WaveEncoder
    from wave_rt.errors import CheckpointError

    opts = JobOptions(engine="ray", dtype="fp32")
    right = WaveEncoder.from_pretrained(None, dtype="fp32").fingerprint
    EmbedActor(None, opts, decode_threads=1, torch_threads=1, fingerprint=right)
    with pytest.raises(CheckpointError, match="not the one the driver read"):
        EmbedActor(None, opts, decode_threads=1, torch_threads=1, fingerprint="0" * 16)


def test_archive_ray_relative_model_path(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # the actors run in the cluster's working directory, not the driver's: a relative --model was looked up
    # there (another model, or none)
    from tiny_checkpoints import make_tiny_checkpoint

    from wave_rt.archive.job import embed_archive

    make_tiny_checkpoint(tmp_path / "ckpt", recipe="all_layer", use_beats=False, seed=5)
    (tmp_path / "m.jsonl").write_text('{"text": "a dog barks"}\n{"text": "rain"}\n')
    monkeypatch.chdir(tmp_path)  # the Ray workers started in pytest's directory
    dist = embed_archive("m.jsonl", "ray", model="ckpt", engine="ray", workers=1, progress=False)
    local = embed_archive("m.jsonl", "local", model="ckpt", device="cpu", workers=1, progress=False)
    assert dist.complete and dist.embedded == local.embedded == 2
    a, b = read_archive(tmp_path / "local"), read_archive(tmp_path / "ray")
    assert max(float(np.abs(a[i]["embedding"] - b[i]["embedding"]).max()) for i in a) <= 1e-5


KILLED_BY_POISON = """
import json, os, sys
from pathlib import Path
import ray
from wave_rt.archive import ray_engine
from wave_rt.archive.job import embed_archive

class KilledByPoison(ray_engine.EmbedActor):  # in __main__: Ray ships it by value
    def __call__(self, batch):
        if "poison" in batch.column("id").to_pylist():
            os._exit(1)
        return super().__call__(batch)

ray_engine.EmbedActor = KilledByPoison
tmp = Path(sys.argv[1])
manifest = tmp / "m.jsonl"
manifest.write_text("".join(json.dumps({"id": "poison" if i == 5 else f"t{i}", "text": f"sentence number {i}"})
                            + "\\n" for i in range(24)))
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
s = embed_archive(manifest, tmp / "out", model=None, engine="ray", replicas=2, progress=False, shard_rows=4)
print("RESULT", json.dumps({"complete": s.complete, "embedded": s.embedded, "failed": s.failed}))
"""


def test_archive_ray_contains_an_item_that_kills_its_actor(tmp_path: Path) -> None:
    # Ray Data retried an actor task without end: one item that killed its actor every time (a decoder
    # segfault, the OOM killer) looped until the 30-minute no-progress timeout, and no run could complete. The
    # driver runs in its own process, as `wave-rt embed --engine ray` does.
    import json
    import os
    import subprocess
    import sys

    from wave_rt.archive.journal import read_errors

    env = {**os.environ, "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}
    r = subprocess.run([sys.executable, "-c", KILLED_BY_POISON, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert json.loads(line[len("RESULT "):]) == {"complete": True, "embedded": 23, "failed": 1}
    rows = read_archive(tmp_path / "out")
    assert set(rows) == {f"t{i}" for i in range(24) if i != 5}
    (err,) = read_errors(tmp_path / "out")
    assert err["id"] == "poison" and err["error"] == "DecodeWorkerCrashError" and err["retryable"]
