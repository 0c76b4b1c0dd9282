"""Decode in spawn worker processes: the same items in the same order as the thread path, a SIGKILLed
worker loses no item and is reported once, a blocking decoder is stopped by the per-item timeout and lands
in errors.jsonl as a DecodeTimeoutError."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from archive_helpers import CrashingEncoder, EnvEncoder, FakeEncoder, read_archive, write_wavs

from wave_rt.archive.job import embed_archive
from wave_rt.archive.journal import ErrorRecord
from wave_rt.archive.prepare import PreparedEntry, prepare_one
from wave_rt.archive.prepare_pool import PreparePool, preparer_spec
from wave_rt.archive.sources import SourceEntry

pytestmark = pytest.mark.timeout(600)


def _items(paths: list[Path], texts: list[str] = ()) -> list[tuple[int, SourceEntry]]:
    srcs = [SourceEntry(id=p.stem, path=str(p)) for p in paths] + [SourceEntry(id=f"t{i}", text=t)
                                                                  for i, t in enumerate(texts)]
    return list(enumerate(srcs))


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_pool_prepares_what_the_thread_path_prepares_in_order(tmp_path: Path) -> None:
    from wave_rt.embed.encoder import WaveEncoder

    enc = WaveEncoder.from_pretrained("demo", device="cpu")
    paths = write_wavs(tmp_path, [f"a{i}.wav" for i in range(5)], seconds=1.3)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk" * 8)
    items = _items(paths + [tmp_path / "bad.wav"], texts=["a dog barks", "rain on a roof"])
    threads = [prepare_one(enc, src, key, None) for key, src in items]
    with PreparePool(preparer_spec(enc), None, 2) as pool:
        procs = list(pool.imap(items))
    assert [type(o) for o in procs] == [type(o) for o in threads]
    assert isinstance(threads[-3], ErrorRecord) and threads[-3].error == procs[-3].error == "CorruptMediaError"
    for t, p in zip(threads, procs):
        if isinstance(t, PreparedEntry):
            assert (t.key, t.src, t.modality) == (p.key, p.src, p.modality)
            assert _same(t.prepared, p.prepared), t.src.id


def test_sigkilled_worker_loses_no_item_and_is_reported_once(tmp_path: Path, caplog) -> None:
    paths = write_wavs(tmp_path, ["a.wav", "kill-me.wav", "b.wav", "c.wav"])
    items = _items(paths)
    with caplog.at_level(logging.WARNING, logger="wave_rt.archive.prepare_pool"):
        with PreparePool(CrashingEncoder(once=True), None, 2) as pool:
            out = list(pool.imap(items))
            stats = pool.stats
    assert all(isinstance(o, PreparedEntry) for o in out)
    assert [o.src.id for o in out] == ["a", "kill-me", "b", "c"]
    ref = [prepare_one(FakeEncoder(), src, key, None) for key, src in items]
    assert all(np.array_equal(o.prepared.vector, r.prepared.vector) for o, r in zip(out, ref))
    assert stats.crashes == 1 and stats.crashed_ids == ["kill-me"]
    died = [r for r in caplog.records if "died" in r.getMessage()]
    assert len(died) == 1 and "kill-me" in died[0].getMessage() and "signal 9" in died[0].getMessage()


def test_item_that_kills_every_worker_becomes_one_error(tmp_path: Path) -> None:
    paths = write_wavs(tmp_path, ["a.wav", "kill-always.wav", "b.wav"])
    with PreparePool(CrashingEncoder(once=False), None, 2) as pool:
        out = list(pool.imap(_items(paths)))
        assert pool.stats.crashes == 2
    assert isinstance(out[0], PreparedEntry) and isinstance(out[2], PreparedEntry)
    assert isinstance(out[1], ErrorRecord) and out[1].error == "DecodeWorkerCrashError" and out[1].retryable


def test_blocking_decoder_is_stopped_by_the_item_timeout(tmp_path: Path) -> None:
    media = tmp_path / "media"
    write_wavs(media, ["a.wav", "block.wav", "b.wav", "kill.wav", "c.wav"])
    out = tmp_path / "out"
    summary = embed_archive(media, out, model=CrashingEncoder(once=True), workers=2, item_timeout=3.0,
                            progress=False)
    rows = read_archive(out)
    assert sorted(rows) == ["a.wav", "b.wav", "c.wav", "kill.wav"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["stage"], e["error"], e["retryable"]) for e in errors] == [
        ("block.wav", "decode", "DecodeTimeoutError", False)]
    assert "per-item timeout of 3 s" in errors[0]["message"]
    assert summary.failed == 1


def test_thread_and_process_jobs_write_the_same_archive(tmp_path: Path) -> None:
    media = tmp_path / "media"
    write_wavs(media, [f"x{i}.wav" for i in range(6)])
    (media / "gone.wav").symlink_to(media / "missing-target.wav")  # FakeEncoder fails on it: FileNotFoundError
    for mode in ("threads", "processes"):
        embed_archive(media, tmp_path / mode, model=FakeEncoder(), workers=2, decode=mode, progress=False)
    a, b = read_archive(tmp_path / "threads"), read_archive(tmp_path / "processes")
    assert a.keys() == b.keys() and len(a) == 6
    assert all(np.array_equal(a[k]["embedding"], b[k]["embedding"]) for k in a)
    errors = (tmp_path / "threads/errors.jsonl").read_text()
    assert '"gone.wav"' in errors and errors == (tmp_path / "processes/errors.jsonl").read_text()


def test_routing_text_in_process_media_to_workers_gpu_video_to_dali(monkeypatch) -> None:
    from types import SimpleNamespace

    import wave_rt.media.backends as backends
    from wave_rt.archive.errors import JobOptionsError
    from wave_rt.archive.options import JobOptions
    from wave_rt.archive.pipeline import LocalPipeline

    pipe = LocalPipeline(FakeEncoder(), SimpleNamespace(progress=None), JobOptions(max_batch_tokens=64, workers=1))
    text, audio, video = (SourceEntry("t", text="x"), SourceEntry("a", path="/x/a.flac"),
                          SourceEntry("v", path="/x/v.mp4"))
    assert [pipe._in_process(s) for s in (text, audio, video)] == [True, False, False]
    monkeypatch.setattr(backends, "resolve_backend", lambda name: "dali")
    pipe.cuda, pipe._gpu_video = True, None  # a CUDA encoder with DALI installed
    assert [pipe._in_process(s) for s in (text, audio, video)] == [True, False, True]
    with pytest.raises(JobOptionsError, match="decode='fork': must be one of"):
        JobOptions(max_batch_tokens=64, workers=1, decode="fork")


def test_workers_that_cannot_start_break_the_pool_loudly(tmp_path: Path) -> None:
    from archive_helpers import UnbuildableSpec

    from wave_rt.archive.prepare_pool import PoolBrokenError

    paths = write_wavs(tmp_path, ["a.wav", "b.wav"])
    with PreparePool(UnbuildableSpec(), None, 1) as pool:
        futures = [pool.submit(k, s) for k, s in _items(paths)]
        for f in futures:
            with pytest.raises(PoolBrokenError, match="before they could take an item"):
                f.result(timeout=300)
        with pytest.raises(PoolBrokenError):
            pool.submit(9, SourceEntry("late", path=str(paths[0])))


def test_workers_exit_when_the_job_process_is_killed(tmp_path: Path) -> None:
    # A SIGKILLed job (test_archive_crash does this) must not leave its decode workers behind.
    import signal
    import subprocess
    import sys
    import time

    code = (
        f"import sys, time; sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, "
        f"{str(Path(__file__).resolve().parents[1])!r}]\n"
        "from archive_helpers import FakeEncoder\n"
        "from wave_rt.archive.prepare_pool import PreparePool\n"
        "pool = PreparePool(FakeEncoder(), None, 2)\n"
        "while not all(w.ready for w in pool._workers): time.sleep(0.1)\n"
        "print(*pool.pids(), flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if _running(p)]
    assert alive == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_killed_at_random_moments_lose_nothing(tmp_path: Path) -> None:
    # Kills land wherever the workers are: reading a task, preparing, halfway through sending a result. With a
    # shared result queue a worker killed while holding its lock stalled every other worker for good.
    import os
    import signal
    import threading
    import time

    paths = write_wavs(tmp_path, [f"w{i:02d}.wav" for i in range(40)], seconds=0.2)
    items = _items(paths)
    with PreparePool(FakeEncoder(prepare_delay=0.01), None, 2) as pool:
        done = threading.Event()

        def killer() -> None:
            # One kill per item: an item whose second worker dies too is reported by design (another test),
            # and a worker holds the next item too, so a retried item can still be running at the next kill.
            kills = 0
            hit: set[int] = set()
            while kills < 3 and not done.is_set():
                time.sleep(0.05 + 0.1 * kills)
                busy = [(w.process.pid, t.key) for w in pool._workers
                        if (t := w.task) is not None and t.key not in hit and w.process.is_alive()]
                if busy:
                    os.kill(busy[0][0], signal.SIGKILL)
                    hit.add(busy[0][1])
                    kills += 1

        t = threading.Thread(target=killer)
        t.start()
        out = list(pool.imap(items * 5))
        done.set()
        t.join()
        crashes = pool.stats.crashes
    assert len(out) == 200 and all(isinstance(o, PreparedEntry) for o in out)
    assert [o.src.id for o in out] == [s.id for _, s in items * 5]
    assert crashes >= 1


def test_items_held_behind_a_dying_item_are_not_charged_for_its_crash(tmp_path: Path) -> None:
    # One worker holds two items (the one in progress and the next): when the first kills it, the second goes
    # back to the queue in order, uncounted, and is prepared once; only the killer is reported.
    from wave_rt.archive.prepare_pool import WORKER_DEPTH

    assert WORKER_DEPTH >= 2
    paths = write_wavs(tmp_path, ["a.wav", "kill-always.wav", "b.wav", "c.wav", "d.wav"])
    with PreparePool(CrashingEncoder(once=False), None, 1) as pool:
        out = list(pool.imap(_items(paths), window=5))
        stats = pool.stats
    assert [o.src.id if isinstance(o, PreparedEntry) else o.id for o in out] == ["a", "kill-always", "b", "c", "d"]
    assert isinstance(out[1], ErrorRecord) and out[1].error == "DecodeWorkerCrashError"
    assert all(isinstance(o, PreparedEntry) for i, o in enumerate(out) if i != 1)
    assert stats.crashes == 2 and stats.crashed_ids == ["kill-always", "kill-always"]


def test_closing_a_pool_that_is_still_starting_stops_its_workers(tmp_path: Path) -> None:
    pool = PreparePool(FakeEncoder(), None, 2)
    procs = [w.process for w in pool._workers]
    pool.close()
    assert all(not p.is_alive() for p in procs)


def test_workers_are_single_threaded_libraries(tmp_path: Path) -> None:
    # A worker is one core: the thread-pool variables reach the child, the parent's environment is unchanged.
    import os

    from wave_rt.archive.prepare_pool import _SINGLE_THREAD_ENV

    before = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    with PreparePool(EnvEncoder(), None, 1) as pool:
        (out,) = list(pool.imap(_items(write_wavs(tmp_path, ["a.wav"]))))
    assert out.prepared.env == {k: "1" for k in _SINGLE_THREAD_ENV}
    assert {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV} == before


def test_small_media_job_is_bridged_in_threads_without_starting_workers(tmp_path: Path, monkeypatch) -> None:
    # wave_rt's processor runs in threads until the worker processes are up; a job that ends before the pool
    # is due never starts it, and embeds what the worker processes embed.
    import wave_rt.archive.pipeline as pipeline
    from wave_rt.embed.encoder import WaveEncoder

    enc = WaveEncoder.from_pretrained("demo", device="cpu")
    media = tmp_path / "media"
    write_wavs(media, [f"a{i}.wav" for i in range(3)], seconds=1.2)
    started: list[int] = []
    real_pool = pipeline.PreparePool

    def counting_pool(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        started.append(1)
        return real_pool(*a, **kw)

    monkeypatch.setattr(pipeline, "PreparePool", counting_pool)
    monkeypatch.setattr(pipeline, "POOL_START_AFTER", 1e9)
    embed_archive(media, tmp_path / "bridged", model=enc, workers=2, progress=False)
    assert started == []
    embed_archive(media, tmp_path / "procs", model=enc, workers=2, decode="processes", progress=False)
    assert started == [1]
    a, b = read_archive(tmp_path / "bridged"), read_archive(tmp_path / "procs")
    assert a.keys() == b.keys() and len(a) == 3
    for k in a:
        np.testing.assert_allclose(a[k]["embedding"], b[k]["embedding"], rtol=0, atol=1e-6)


def test_bridged_item_past_the_timeout_is_abandoned_and_reported(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from wave_rt.archive.options import JobOptions
    from wave_rt.archive.pipeline import LocalPipeline

    pipe = LocalPipeline(CrashingEncoder(), SimpleNamespace(progress=None),
                         JobOptions(max_batch_tokens=64, workers=1, item_timeout=0.3))
    ok, block = write_wavs(tmp_path, ["ok.wav", "block.wav"])
    out = pipe._prepare_bounded(0, SourceEntry("ok", path=str(ok)))
    assert isinstance(out, PreparedEntry) and out.key == 0
    rec = pipe._prepare_bounded(1, SourceEntry("block", path=str(block)))  # its thread sleeps for an hour
    assert isinstance(rec, ErrorRecord) and rec.error == "DecodeTimeoutError" and not rec.retryable
    assert "per-item timeout of 0.3 s" in rec.message
    assert pipe.bridge_timeouts == 1 and pipe.bridged == 1


def test_a_second_close_waits_for_the_first_and_reaps_nothing_twice(tmp_path: Path) -> None:
    # The pipeline's last decode thread closes the pool while the job may close it again: the later call
    # must return only once every worker is reaped, whichever thread got there first.
    import threading

    pool = PreparePool(FakeEncoder(), None, 2)
    list(pool.imap(_items(write_wavs(tmp_path, ["a.wav", "b.wav"]))))  # the workers are up and have worked
    procs = [w.process for w in pool._workers]
    entered, first_done = threading.Event(), threading.Event()
    real_close = pool._close

    def slow_close() -> None:
        entered.set()
        real_close()
        threading.Event().wait(0.3)  # the second call arrives while the first is still reaping
        first_done.set()

    pool._close = slow_close  # type: ignore[method-assign]
    t = threading.Thread(target=pool.close)
    t.start()
    assert entered.wait(30)
    pool.close()
    assert first_done.is_set() and all(not p.is_alive() for p in procs)
    t.join(30)
    pool.close()  # a third call: nothing left to do
    with pytest.raises(Exception, match="closed"):
        pool.submit(0, SourceEntry("x", text="late"))


def test_workers_stop_when_the_last_item_is_decoded_not_after_the_last_forward(tmp_path: Path,
                                                                              monkeypatch) -> None:
    # Stopping the worker processes takes each one its interpreter's shutdown; the pipeline's last decode
    # thread starts it as soon as nothing is left to decode, so it overlaps the model's last forwards.
    import time

    from wave_rt.archive import prepare_pool

    events: list[tuple[str, float]] = []
    real_close = prepare_pool.PreparePool.close

    def close(self):  # noqa: ANN001, ANN202
        events.append(("close", time.monotonic()))
        real_close(self)

    real_embed = FakeEncoder.embed_prepared

    def slow_embed(self, batch, normalize=True):  # noqa: ANN001, ANN202
        time.sleep(0.5)  # a forward that takes a while, as a large model's does
        out = real_embed(self, batch, normalize)
        events.append(("forward", time.monotonic()))
        return out

    monkeypatch.setattr(prepare_pool.PreparePool, "close", close)
    monkeypatch.setattr(FakeEncoder, "embed_prepared", slow_embed)
    media = tmp_path / "media"
    write_wavs(media, [f"a{i}.wav" for i in range(6)])
    s = embed_archive(media, tmp_path / "out", model=FakeEncoder(), workers=2, decode="processes",
                      max_batch_tokens=64, progress=False)
    assert s.embedded == 6 and s.batches >= 2
    closes = [t for e, t in events if e == "close"]
    last_forward = max(t for e, t in events if e == "forward")
    assert len(closes) == 2  # the last decode thread's, then the job's (which finds it done)
    assert closes[0] < last_forward
    assert s.first_forward_at is not None and s.last_forward_end_at is not None
    assert 0 < s.first_forward_at < s.last_forward_end_at <= s.wall_seconds
    assert s.model_active_seconds is not None and 0.5 * s.batches <= s.model_active_seconds <= s.wall_seconds
