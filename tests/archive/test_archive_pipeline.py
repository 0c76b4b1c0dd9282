"""The local engine with a fake encoder: out-of-memory splitting, isolation of items that break the forward,
retryable vs permanent failures, duplicates, shard sizes, bounded pending work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from archive_helpers import FakeEncoder, read_archive, read_error_ids

from wave_rt.archive.job import embed_archive
from wave_rt.embed.runner import ModelRunner


def _manifest(path: Path, texts: list[str], ids: list[str] | None = None) -> Path:
    rows = [{"id": ids[i] if ids else f"i{i}", "text": t} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _texts(n: int) -> list[str]:
    return [f"text number {i} " + "x" * (i * 7 % 90) for i in range(n)]


def test_archive_pipeline_oom_splits_and_all_rows_land(tmp_path: Path) -> None:
    texts = _texts(120)
    enc = FakeEncoder(oom_above=200)
    summary = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=enc,
                            max_batch_tokens=1024, workers=2, progress=False)
    rows = read_archive(tmp_path / "out")
    assert len(rows) == 120 and summary.failed == 0
    assert summary.oom_splits > 0
    ref = FakeEncoder().encode(texts)
    got = np.stack([rows[f"i{i}"]["embedding"] for i in range(120)])
    assert np.array_equal(got, ref)


def test_archive_pipeline_runner_lowers_then_regrows_cap() -> None:
    enc = FakeEncoder(oom_above=100)
    runner = ModelRunner(enc, max_batch_tokens=1000, regrow_after=3)
    items = [enc.prepare("y" * 40) for _ in range(20)]  # 12 tokens each
    ok, failed = runner.run(items)
    assert len(ok) == 20 and not failed
    assert runner.cap < 1000 and runner.oom_splits >= 1
    capped = runner.cap
    enc.oom_above = None
    for _ in range(4):
        runner.run(items[:2])
    assert runner.cap > capped  # grows back after clean batches
    assert max(enc.calls[:-4]) * 12 <= 100  # every successful batch under the OOM threshold


@pytest.mark.parametrize("oom_above", [None, 150])
def test_runner_block_keeps_input_order_around_failures(oom_above: int | None) -> None:
    """run_block's array is the successful items' vectors in input order, whatever order the forwards ran
    in (longest first, halves after an out-of-memory split) and whichever items failed; run() agrees."""
    texts = _texts(33)
    for i in (0, 9, 32):
        texts[i] = f"poison {i}"
    enc = FakeEncoder(oom_above=oom_above, fail_on={texts[0], texts[9], texts[32]})
    items = [enc.prepare(t) for t in texts]
    emb, good, failed = ModelRunner(enc, max_batch_tokens=10_000).run_block(items)
    assert good == [i for i in range(33) if i not in (0, 9, 32)] and sorted(failed) == [0, 9, 32]
    assert emb.dtype == np.float32 and np.array_equal(emb, FakeEncoder().encode([texts[i] for i in good]))
    ok, failed2 = ModelRunner(FakeEncoder(oom_above=oom_above, fail_on=enc.fail_on), max_batch_tokens=10_000).run(items)
    assert sorted(ok) == good and sorted(failed2) == [0, 9, 32]
    assert all(np.array_equal(ok[i], emb[j]) for j, i in enumerate(good))
    none_ok, _, all_failed = ModelRunner(enc, max_batch_tokens=10_000).run_block([items[0], items[9]])
    assert none_ok.size == 0 and sorted(all_failed) == [0, 1]


def test_archive_pipeline_single_item_oom_is_retryable(tmp_path: Path) -> None:
    texts = ["short", "z" * 1200, "also short"]  # the long one is 302 tokens: over the OOM threshold alone
    src = _manifest(tmp_path / "m.jsonl", texts)
    out = tmp_path / "out"
    s1 = embed_archive(src, out, model=FakeEncoder(oom_above=250), progress=False)
    assert s1.embedded == 2 and s1.failed == 1
    (err,) = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert err["id"] == "i1" and err["stage"] == "model" and err["retryable"] is True
    assert err["error"] == "OutOfMemoryError"
    s2 = embed_archive(src, out, model=FakeEncoder(), progress=False)  # more memory now: retried, succeeds
    assert s2.embedded == 1 and s2.failed == 0
    assert set(read_archive(out)) == {"i0", "i1", "i2"} and read_error_ids(out) == []


def test_archive_pipeline_poisoned_item_is_isolated(tmp_path: Path) -> None:
    texts = _texts(40)
    texts[17] = "poison"
    summary = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out",
                            model=FakeEncoder(fail_on={"poison"}), progress=False)
    assert summary.embedded == 39 and summary.failed == 1
    assert read_error_ids(tmp_path / "out") == ["i17"]


def test_archive_pipeline_broken_model_stops_the_job(tmp_path: Path) -> None:
    texts = ["poison"] * 30
    ids = [f"p{i}" for i in range(30)]
    with pytest.raises(RuntimeError, match="poisoned"):
        embed_archive(_manifest(tmp_path / "m.jsonl", texts, ids), tmp_path / "out",
                      model=FakeEncoder(fail_on={"poison"}), progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "running"  # not marked complete


class ExplodingEncoder(FakeEncoder):
    def prepare(self, item, instruction=None, index=None):  # noqa: ANN001, ANN201
        if item == "explode":
            raise ZeroDivisionError("a bug in preprocessing")
        return super().prepare(item, instruction, index)


def test_archive_pipeline_unexpected_prepare_error_is_retried(tmp_path: Path) -> None:
    src = _manifest(tmp_path / "m.jsonl", ["fine", "explode", "   ", "fine too"])
    out = tmp_path / "out"
    s1 = embed_archive(src, out, model=ExplodingEncoder(), progress=False)
    assert s1.embedded == 2 and s1.failed == 2
    errs = {json.loads(x)["id"]: json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()}
    assert errs["i1"]["retryable"] is True and errs["i1"]["error"] == "ZeroDivisionError"
    assert errs["i2"]["retryable"] is False and errs["i2"]["error"] == "InputError"  # empty text: permanent
    s2 = embed_archive(src, out, model=FakeEncoder(), progress=False)  # the bug is fixed
    assert s2.embedded == 1 and s2.failed == 0
    assert set(read_archive(out)) == {"i0", "i1", "i3"} and read_error_ids(out) == ["i2"]
    s3 = embed_archive(src, out, model=FakeEncoder(), progress=False, retry_errors=True)
    assert s3.failed == 1 and read_error_ids(out) == ["i2"]  # retried on request, still bad, listed once


def test_archive_pipeline_shard_rows_and_journal(tmp_path: Path) -> None:
    out = tmp_path / "out"
    embed_archive(_manifest(tmp_path / "m.jsonl", _texts(50)), out, model=FakeEncoder(), shard_rows=8,
                  progress=False)
    shards = sorted(out.glob("part-*.parquet"))
    import pyarrow.parquet as pq

    sizes = [pq.ParquetFile(p).metadata.num_rows for p in shards]
    assert sum(sizes) == 50 and max(sizes) <= 8
    assert [p.name for p in shards] == [f"part-{i:05d}.parquet" for i in range(len(shards))]
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    assert [(j["shard"], j["rows"]) for j in journal] == [(p.name, n) for p, n in zip(shards, sizes)]


def test_archive_pipeline_pending_tokens_bound(tmp_path: Path) -> None:
    """A batcher that never fills (budget far above the items) still runs everything, and in batches whose
    waiting tokens stay under the pending bound."""
    from wave_rt.archive.pipeline import LocalPipeline

    enc = FakeEncoder()
    sizes: list[int] = []
    orig = enc.embed_prepared

    def spy(batch, normalize=True):  # noqa: ANN001, ANN202
        sizes.append(sum(p.num_tokens for p in batch))
        return orig(batch, normalize)

    enc.embed_prepared = spy  # type: ignore[method-assign]
    real_init = LocalPipeline.__init__

    def small_bound(self, *a, **kw):  # noqa: ANN001, ANN202
        kw["max_pending_tokens"] = 300
        real_init(self, *a, **kw)

    LocalPipeline.__init__ = small_bound  # type: ignore[method-assign]
    try:
        s = embed_archive(_manifest(tmp_path / "m.jsonl", _texts(200)), tmp_path / "out", model=enc,
                          max_batch_tokens=100_000, progress=False)
    finally:
        LocalPipeline.__init__ = real_init  # type: ignore[method-assign]
    assert s.embedded == 200
    assert max(sizes) <= 300 + 30  # the bound plus the one item that crossed it


def test_archive_pipeline_oom_type_matches_torch() -> None:
    from wave_rt.embed.runner import OutOfMemory

    assert issubclass(torch.OutOfMemoryError, OutOfMemory)


def _with_model_threads(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The threaded engine (batcher and model threads, as on CUDA) for a CPU encoder."""
    from wave_rt.archive.pipeline import LocalPipeline

    real_init = LocalPipeline.__init__

    def init(self, *a, **kw):  # noqa: ANN001, ANN202
        kw["model_threads"] = n
        real_init(self, *a, **kw)

    monkeypatch.setattr(LocalPipeline, "__init__", init)


def test_archive_pipeline_idle_model_gets_an_early_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job smaller than one token budget, threaded engine: the model must not wait for every item to be
    prepared. The first forward runs as soon as an eighth of the budget is waiting while the model is idle
    (fixed job cost, issue 16). (On a CPU device text is prepared between forwards instead, see below.)"""
    _with_model_threads(monkeypatch, 2)
    enc = FakeEncoder(prepare_delay=0.01)
    sizes: list[int] = []
    prepared_at_first_forward: list[int] = []
    prepared = [0]
    orig_embed, orig_prepare = enc.embed_prepared, enc.prepare

    def prepare(item, instruction=None, index=None):  # noqa: ANN001, ANN202
        out = orig_prepare(item, instruction, index)
        prepared[0] += 1
        return out

    def spy(batch, normalize=True):  # noqa: ANN001, ANN202
        if not sizes:
            prepared_at_first_forward.append(prepared[0])
        sizes.append(sum(p.num_tokens for p in batch))
        return orig_embed(batch, normalize)

    enc.embed_prepared, enc.prepare = spy, prepare  # type: ignore[method-assign]
    texts = _texts(60)
    tokens = [2 + len(t) // 4 for t in texts]
    assert sum(tokens) < 800 * 3  # few buckets could fill: without early batches the model would mostly wait
    s = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=enc, max_batch_tokens=800,
                      workers=1, progress=False)
    assert s.embedded == 60 and s.failed == 0
    assert sum(sizes) == sum(tokens)
    # the first early release (budget // 8 = 100 tokens waiting) is ~6 items in; 0.01 s per prepared item
    # leaves the model half a second to start before the last one
    assert prepared_at_first_forward[0] < 60
    assert sizes[0] <= 100 + max(tokens)
    rows = read_archive(tmp_path / "out")
    ref = FakeEncoder().encode(texts)
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(60)]), ref)


def test_cpu_text_is_prepared_between_forwards_on_the_callers_thread(tmp_path: Path) -> None:
    """On a CPU device tokenizing never runs beside a forward (a thread tokenizing beside the forward's OpenMP
    team slowed the demo model's forwards ~15%): text is prepared on the caller's thread between forwards,
    a text-only job starts no decode thread, and the pending bound and the batches' budget still hold."""
    import threading

    enc = FakeEncoder()
    in_forward = threading.Event()
    prepare_threads: set[threading.Thread] = set()
    overlaps: list[str] = []
    sizes: list[int] = []
    decode_threads: list[str] = []
    orig_embed, orig_prepare = enc.embed_prepared, enc.prepare

    def prepare(item, instruction=None, index=None):  # noqa: ANN001, ANN202
        prepare_threads.add(threading.current_thread())
        if in_forward.is_set():
            overlaps.append(str(item))
        return orig_prepare(item, instruction, index)

    def spy(batch, normalize=True):  # noqa: ANN001, ANN202
        decode_threads.extend(t.name for t in threading.enumerate() if t.name.startswith("wave-rt-decode"))
        in_forward.set()
        try:
            sizes.append(sum(p.num_tokens for p in batch))
            return orig_embed(batch, normalize)
        finally:
            in_forward.clear()

    enc.embed_prepared, enc.prepare = spy, prepare  # type: ignore[method-assign]
    texts = _texts(700)
    s = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=enc, max_batch_tokens=300,
                      workers=2, progress=False)
    assert s.embedded == 700 and s.failed == 0
    assert prepare_threads == {threading.current_thread()}
    assert overlaps == []
    assert decode_threads == []
    assert len(sizes) > 10 and max(sizes) <= 300  # real tokens <= B x longest <= the budget
    rows = read_archive(tmp_path / "out")
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(700)]), FakeEncoder().encode(texts))


def test_cpu_forwards_run_on_the_callers_thread(tmp_path: Path) -> None:
    """The thread that loaded the model runs its CPU forwards: a second thread starting OpenMP regions made
    libgomp stop spin-waiting (two teams > cores), 1.7x slower forwards of the demo model."""
    import threading

    enc = FakeEncoder()
    seen: list[threading.Thread] = []
    orig = enc.embed_prepared

    def spy(batch, normalize=True):  # noqa: ANN001, ANN202
        seen.append(threading.current_thread())
        return orig(batch, normalize)

    enc.embed_prepared = spy  # type: ignore[method-assign]
    s = embed_archive(_manifest(tmp_path / "m.jsonl", _texts(100)), tmp_path / "out", model=enc,
                      max_batch_tokens=300, workers=2, progress=False)
    assert s.embedded == 100 and len(seen) > 1
    assert set(seen) == {threading.current_thread()}


@pytest.mark.parametrize("packed", [True, False])
def test_archive_batches_follow_the_encoders_budget_rule(tmp_path: Path, packed: bool) -> None:
    """The job batches as encode() does: a packed encoder's budget counts real tokens (sum of lengths), a padded
    one's B x longest; every item lands either way."""
    enc = FakeEncoder()
    enc.packed = packed
    batches: list[list[int]] = []
    orig = enc.embed_prepared

    def spy(batch, normalize=True):  # noqa: ANN001, ANN202
        batches.append([p.num_tokens for p in batch])
        return orig(batch, normalize)

    enc.embed_prepared = spy  # type: ignore[method-assign]
    texts = _texts(200)
    budget = 400
    s = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=enc, max_batch_tokens=budget,
                      workers=1, progress=False)
    assert s.embedded == 200 and sum(len(b) for b in batches) == 200
    cost = [sum(b) if packed else max(b) * len(b) for b in batches]
    assert max(cost) <= budget
    if packed:  # real-token budgeting fills batches the padded rule would have split
        assert max(max(b) * len(b) for b in batches) > budget


@pytest.mark.parametrize("threaded", [False, True])
def test_where_the_writer_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool) -> None:
    """On a CPU device (one model thread on the caller's) there is no writer thread: every shard is committed by
    the caller's thread. With model threads (as on CUDA) the writer thread commits, except the job's final
    shard: the closing thread writes it (right after CPU forwards, another thread took ~8x longer while their
    OpenMP team still spun). All rows land either way."""
    import threading

    import wave_rt.archive.writer as writer_mod

    if threaded:
        _with_model_threads(monkeypatch, 2)
    writers: list[str] = []
    names: list[str] = []
    real = writer_mod.write_shard

    def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        writers.append(threading.current_thread().name)
        names.extend(t.name for t in threading.enumerate())
        return real(*a, **kw)

    monkeypatch.setattr(writer_mod, "write_shard", spy)
    texts = _texts(250)
    s = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=FakeEncoder(),
                      max_batch_tokens=300, shard_rows=100, progress=False)
    assert s.embedded == 250
    me = threading.current_thread().name
    assert writers == (["wave-rt-writer", "wave-rt-writer", me] if threaded else [me, me, me])
    assert ("wave-rt-writer" in names) == threaded
    rows = read_archive(tmp_path / "out")
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(250)]), FakeEncoder().encode(texts))


def test_objects_older_than_the_job_are_frozen_while_it_runs(tmp_path: Path) -> None:
    """Full garbage collections skip the objects that existed before the job (a 0.19 s pause each on the demo
    setup otherwise) while it runs; afterwards the collector is as it was, and a caller's own freeze is kept."""
    import gc

    enc = FakeEncoder()
    frozen_during: list[int] = []
    orig = enc.embed_prepared

    def spy(batch, normalize=True):  # noqa: ANN001, ANN202
        frozen_during.append(gc.get_freeze_count())
        return orig(batch, normalize)

    enc.embed_prepared = spy  # type: ignore[method-assign]
    assert gc.get_freeze_count() == 0
    embed_archive(_manifest(tmp_path / "m.jsonl", _texts(20)), tmp_path / "a", model=enc, progress=False)
    assert frozen_during and min(frozen_during) > 1000
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        frozen_during.clear()
        embed_archive(_manifest(tmp_path / "m2.jsonl", _texts(20)), tmp_path / "b", model=enc, progress=False)
        # neither frozen again nor unfrozen (a frozen object that dies still leaves the count)
        assert frozen_during and all(mine - 1000 < n <= mine for n in frozen_during)
        assert mine - 1000 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("keep", [10_000, 5])
def test_a_small_source_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: int) -> None:
    """The scan keeps what it classified for a source of at most SCAN_KEEP_ITEMS items (read once); a bigger one
    is read again to stream it. Same archive, same error records (a duplicate id, a malformed row) either way."""
    import wave_rt.archive.job as job

    monkeypatch.setattr(job, "SCAN_KEEP_ITEMS", keep)
    reads = [0]
    real_classify = job._classify

    def counting_classify(*a):  # noqa: ANN002, ANN202
        reads[0] += 1
        return real_classify(*a)

    monkeypatch.setattr(job, "_classify", counting_classify)
    texts = _texts(12)
    m = _manifest(tmp_path / "m.jsonl", texts, ids=[f"i{i}" for i in range(11)] + ["i3"])
    with open(m, "a") as f:
        f.write('{"id": "bad"}\n')
    s = embed_archive(m, tmp_path / "out", model=FakeEncoder(), progress=False)
    assert reads[0] == (1 if keep >= 13 else 2)
    assert s.embedded == 11
    assert sorted(read_error_ids(tmp_path / "out")) == ["bad", "i3"]
    rows = read_archive(tmp_path / "out")
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(11)]), FakeEncoder().encode(texts[:11]))


@pytest.mark.parametrize("threaded", [False, True])
def test_commit_seconds_and_a_failing_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool) -> None:
    """Both writer modes: commit_seconds=0 commits as rows come (several shards under a huge shard_rows); a
    shard write that fails stops the job with WriterFailed, keeps what was committed, and a rerun completes
    the archive with every row exactly once."""
    import wave_rt.archive.writer as writer_mod
    from wave_rt.archive.writer import WriterFailed

    if threaded:
        _with_model_threads(monkeypatch, 2)
    texts = _texts(300)
    m = _manifest(tmp_path / "m.jsonl", texts)
    s = embed_archive(m, tmp_path / "a", model=FakeEncoder(), max_batch_tokens=300, shard_rows=10**6,
                      commit_seconds=0, progress=False)
    assert s.embedded == 300 and len(list((tmp_path / "a").glob("part-*.parquet"))) > 1

    real = writer_mod.write_shard
    calls = [0]

    def failing(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(writer_mod, "write_shard", failing)
    with pytest.raises(WriterFailed, match="No space left"):
        embed_archive(m, tmp_path / "b", model=FakeEncoder(), max_batch_tokens=300, shard_rows=50,
                      progress=False)
    kept = read_archive(tmp_path / "b")
    assert len(kept) == 50
    monkeypatch.setattr(writer_mod, "write_shard", real)
    s = embed_archive(m, tmp_path / "b", model=FakeEncoder(), max_batch_tokens=300, shard_rows=50, progress=False)
    rows = read_archive(tmp_path / "b")
    assert s.embedded == 250 and len(rows) == 300
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(300)]), FakeEncoder().encode(texts))


@pytest.mark.parametrize("stall", [False, True])
def test_cpu_job_holds_at_most_the_pending_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stall: bool) -> None:
    """On a CPU device the caller's thread prepares while input is at hand and runs batches once
    max_pending_tokens wait: tokens prepared but not yet embedded never exceed that bound plus one text
    chunk, with a feeder that never stalls and with one that stalls now and then (early batches)."""
    import time as time_mod

    import wave_rt.archive.job as job
    from wave_rt.archive.pipeline import TEXT_CHUNK, LocalPipeline

    real_init = LocalPipeline.__init__

    def init(self, *a, **kw):  # noqa: ANN001, ANN202
        kw["max_pending_tokens"] = 300
        real_init(self, *a, **kw)

    monkeypatch.setattr(LocalPipeline, "__init__", init)
    real_pending = job.pending_items

    def stalling(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        for i, item in enumerate(real_pending(*a, **kw)):
            if i % 32 == 31:
                time_mod.sleep(0.002)
            yield item

    if stall:
        monkeypatch.setattr(job, "pending_items", stalling)
    texts = _texts(600)
    longest = max(2 + len(t) // 4 for t in texts)
    enc = FakeEncoder()
    outstanding, peak = [0], [0]
    orig_prepare, orig_embed = enc.prepare, enc.embed_prepared

    def prepare(item, instruction=None, index=None):  # noqa: ANN001, ANN202
        out = orig_prepare(item, instruction, index)
        outstanding[0] += out.num_tokens
        peak[0] = max(peak[0], outstanding[0])
        return out

    def embed(batch, normalize=True):  # noqa: ANN001, ANN202
        outstanding[0] -= sum(p.num_tokens for p in batch)
        return orig_embed(batch, normalize)

    enc.prepare, enc.embed_prepared = prepare, embed  # type: ignore[method-assign]
    s = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=enc, max_batch_tokens=120,
                      progress=False)
    assert s.embedded == 600 and outstanding[0] == 0
    assert 300 <= peak[0] <= 300 + TEXT_CHUNK * longest


@pytest.mark.parametrize("media_first", [False, True])
def test_cpu_text_window(tmp_path: Path, media_first: bool) -> None:
    """A text-only CPU job prepares TEXT_WINDOW_BATCHES budgets of tokens between runs of forwards (each switch
    costs the work after it its caches), so it switches a few times, not every few batches; once a media item
    has come, the usual max_pending_tokens bound holds (media features are large)."""
    from wave_rt.archive.pipeline import TEXT_CHUNK, TEXT_WINDOW_BATCHES

    budget = 600  # the two bounds differ by more than a text chunk's tokens
    texts = _texts(1500)
    longest = max(2 + len(t) // 4 for t in texts)
    rows = [{"id": f"i{i}", "text": t} for i, t in enumerate(texts)]
    if media_first:
        clip = tmp_path / "clip.wav"
        clip.write_bytes(b"\0" * 1000)  # the fake encoder reads only the size
        rows.insert(0, {"id": "clip", "path": str(clip)})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = FakeEncoder()
    outstanding, peak, phases, last = [0], [0], [0], ["prepare"]
    orig_prepare, orig_embed = enc.prepare, enc.embed_prepared

    def prepare(item, instruction=None, index=None):  # noqa: ANN001, ANN202
        out = orig_prepare(item, instruction, index)
        outstanding[0] += out.num_tokens
        peak[0] = max(peak[0], outstanding[0])
        last[0] = "prepare"
        return out

    def embed(batch, normalize=True):  # noqa: ANN001, ANN202
        if last[0] == "prepare":
            phases[0] += 1
        last[0] = "forward"
        outstanding[0] -= sum(p.num_tokens for p in batch)
        return orig_embed(batch, normalize)

    enc.prepare, enc.embed_prepared = prepare, embed  # type: ignore[method-assign]
    s = embed_archive(manifest, tmp_path / "out", model=enc, max_batch_tokens=budget, decode="threads", progress=False)
    assert s.embedded == len(rows) and outstanding[0] == 0
    total = sum(2 + len(t) // 4 for t in texts)
    slack = TEXT_CHUNK * longest
    if media_first:
        assert peak[0] <= 4 * budget + slack + 60  # the usual bound, plus the clip's tokens (8 + size % 50)
    else:
        window = TEXT_WINDOW_BATCHES * budget
        assert window <= peak[0] <= window + slack
        assert phases[0] <= total // window + 2
    embedded = read_archive(tmp_path / "out")
    assert np.array_equal(np.stack([embedded[f"i{i}"]["embedding"] for i in range(len(texts))]),
                          FakeEncoder().encode(texts))


@pytest.mark.parametrize("slow", [False, True])
def test_cpu_rows_go_to_the_writer_after_each_run_of_forwards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              slow: bool) -> None:
    """On a CPU device the forwards of a run of full batches are back to back: their rows reach the writer
    when the run ends, or once DELIVER_AFTER_SECONDS have passed since its first forward (a slow model still
    hands rows on as it goes)."""
    import time as time_mod

    import wave_rt.archive.pipeline as pipeline
    from wave_rt.archive.writer import ArchiveWriter

    monkeypatch.setattr(pipeline, "DELIVER_AFTER_SECONDS", 0.05 if slow else 60.0)
    events: list[str] = []
    real_put = ArchiveWriter.put_rows

    def put_rows(self, block):  # noqa: ANN001, ANN202
        events.append("rows")
        return real_put(self, block)

    monkeypatch.setattr(ArchiveWriter, "put_rows", put_rows)
    enc = FakeEncoder()
    orig = enc.embed_prepared

    def embed(batch, normalize=True):  # noqa: ANN001, ANN202
        events.append("forward")
        if slow:
            time_mod.sleep(0.03)
        return orig(batch, normalize)

    orig_prepare = enc.prepare

    def prepare(item, instruction=None, index=None):  # noqa: ANN001, ANN202
        events.append("prepare")
        return orig_prepare(item, instruction, index)

    enc.embed_prepared, enc.prepare = embed, prepare  # type: ignore[method-assign]
    texts = _texts(400)
    s = embed_archive(_manifest(tmp_path / "m.jsonl", texts), tmp_path / "out", model=enc, max_batch_tokens=100,
                      progress=False)
    assert s.embedded == 400
    trace = "".join({"forward": "f", "rows": "r", "prepare": "p"}[e] for e in events)
    runs = [run for run in trace.split("p") if "f" in run]  # runs of forwards, with the rows handed on among them
    assert len(runs) >= 2 and trace.count("f") > 20
    if slow:  # 0.03 s a forward, rows handed on 0.05 s after the first forward not yet handed on
        assert max(len(stretch) for run in runs for stretch in run.split("r")) <= 2
    else:  # every run: its forwards back to back, then its rows (the last: then the input's leftovers likewise)
        assert all(run.endswith("r") for run in runs), trace
        assert all(run.rstrip("r").count("r") == 0 for run in runs[:-1]), trace
    rows = read_archive(tmp_path / "out")
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(400)]), FakeEncoder().encode(texts))


def test_cpu_interrupted_run_keeps_the_batches_it_computed(tmp_path: Path) -> None:
    """A KeyboardInterrupt in the middle of a run of forwards: the batches already computed still reach the
    archive, so the resumed job embeds only the rest."""
    enc = FakeEncoder()
    orig = enc.embed_prepared
    seen: list[list[float]] = []

    def embed(batch, normalize=True):  # noqa: ANN001, ANN202
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append([p.num_tokens for p in batch])
        return orig(batch, normalize)

    enc.embed_prepared = embed  # type: ignore[method-assign]
    texts = _texts(300)
    src, out = _manifest(tmp_path / "m.jsonl", texts), tmp_path / "out"
    s1 = embed_archive(src, out, model=enc, max_batch_tokens=100, progress=False)
    assert s1.interrupted and not s1.complete
    assert s1.embedded == sum(len(b) for b in seen) > 0 and len(read_archive(out)) == s1.embedded
    s2 = embed_archive(src, out, model=FakeEncoder(), max_batch_tokens=100, progress=False)
    assert s2.embedded == 300 - s1.embedded and s2.complete
    rows = read_archive(out)
    assert np.array_equal(np.stack([rows[f"i{i}"]["embedding"] for i in range(300)]), FakeEncoder().encode(texts))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_jobs_reuse_the_model_streams_and_their_memory(tmp_path: Path) -> None:
    """Job after job in one process: the model threads run on the same CUDA streams, so the second job reuses
    the blocks the first freed (the caching allocator reuses a block only on its own stream) and the reserved
    memory does not grow; with a fresh stream per job it grew by the job's working set each time."""
    from wave_rt.archive.pipeline import model_stream
    from wave_rt.embed.encoder import WaveEncoder

    assert model_stream("cuda", 0) is model_stream(torch.device("cuda", torch.cuda.current_device()), 0)
    assert model_stream("cuda", 0) is not model_stream("cuda", 1)
    enc = WaveEncoder.from_pretrained(None, device="cuda", dtype=torch.float32)
    src = _manifest(tmp_path / "m.jsonl", _texts(300))
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()  # the weights
    first = embed_archive(src, tmp_path / "a", model=enc, max_batch_tokens=2048, progress=False)
    torch.cuda.synchronize()
    one_job = torch.cuda.memory_reserved() - base
    for i in range(5):
        last = embed_archive(src, tmp_path / f"b{i}", model=enc, max_batch_tokens=2048, progress=False)
    torch.cuda.synchronize()
    assert first.embedded == last.embedded == 300 and first.batches > 1
    # which thread gets which batch is a race, so a later job may need a larger block on a stream than the
    # first did; per-job streams would reserve ~6 working sets here
    assert one_job > 0 and torch.cuda.memory_reserved() - base <= 2 * one_job, (torch.cuda.memory_reserved(), base,
                                                                                one_job)
    a, b = read_archive(tmp_path / "a"), read_archive(tmp_path / "b4")
    assert a.keys() == b.keys() and len(a) == 300
    assert all(np.allclose(a[k]["embedding"], b[k]["embedding"], atol=1e-5) for k in a)
