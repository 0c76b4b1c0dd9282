"""Bad training data: wrong columns, missing files, empty text, invalid JSON, corrupt media are skipped,
counted and named, never fatal; a manifest with no usable row is a typed error."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from wave_rt.train.data import BatchPlan, PairRowError, PairSource, load_pairs


def _manifest(tmp_path):
    sf.write(tmp_path / "good.wav", (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 3)
    rows = [
        {"query_path": "good.wav", "target_text": "a tone"},
        {"query_text": "a query", "target_text": "a caption"},
        {"query_path": "corrupt.wav", "target_text": "a broken clip"},
        {"query_path": "missing.wav", "target_text": "x"},
        {"query_text": "", "target_text": "x"},
        {"query_text": "q", "target_text": "   "},
        {"question": "no query column", "target_text": "x"},
        {"query_text": "both", "query_path": "good.wav", "target_text": "x"},
        {"query_path": "good.wav", "query_modality": "smell", "target_text": "x"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" + "[1, 2]\n"
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    return path


def test_bad_rows_are_skipped_counted_and_named(tmp_path, caplog):
    skipped = Counter()
    pairs = load_pairs(_manifest(tmp_path), skipped)
    assert [p.row for p in pairs] == [0, 1, 2]
    assert skipped == Counter(bad_row=8)
    text = caplog.text
    for reason in ("missing.wav does not exist", "query_text is empty", "target_text is empty",
                   "needs exactly one of query_text and query_path", "query_modality must be one of",
                   "invalid JSON", "must be an object"):
        assert reason in text, reason
    assert "pairs.jsonl row 3" in text


def test_corrupt_media_is_a_counted_skip_at_prepare(tmp_path, tiny_ckpts):
    from wave_rt.config import WaveConfig
    from wave_rt.embed.processor import WaveProcessor, load_tokenizer

    ckpt = tiny_ckpts["all_layer"]
    processor = WaveProcessor(WaveConfig.from_pretrained(ckpt), load_tokenizer(ckpt))
    source = PairSource(load_pairs(_manifest(tmp_path)), processor, cache=True)
    assert source.prepare(0) is not None and source.prepare(1) is not None
    assert source.prepare(2) is None and source.prepare(2) is None  # counted once
    assert source.skipped == Counter(media=1)
    assert "corrupt.wav" in source.bad[2] and "Error" in source.bad[2].split(":")[0]


def test_unusable_manifests_raise_typed_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"query_text": "", "target_text": ""}) + "\n")
    with pytest.raises(PairRowError, match="no usable rows"):
        load_pairs(empty)
    csv_path = tmp_path / "wrong.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(PairRowError, match="no usable rows"):
        load_pairs(csv_path)
    with pytest.raises(PairRowError, match="unknown manifest format"):
        (tmp_path / "x.txt").write_text("hi")
        load_pairs(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "nope.jsonl")


def test_csv_and_parquet_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"query_text": f"q{i}", "target_text": f"t{i}", "task": "a" if i % 2 else "b"} for i in range(6)]
    (tmp_path / "m.csv").write_text("query_text,target_text,task\n" + "".join(
        f"{r['query_text']},{r['target_text']},{r['task']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    a, b = load_pairs(tmp_path / "m.csv"), load_pairs(tmp_path / "m.parquet")
    assert [(p.query.text, p.target, p.task) for p in a] == [(p.query.text, p.target, p.task) for p in b]


def test_batch_plan_is_deterministic_task_pure_and_distinct(tmp_path):
    rows = [{"query_text": f"q{i}", "target_text": f"caption {i % 4}", "task": f"task{i % 2}"} for i in range(40)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    plan = BatchPlan(pairs, 2, seed=3, one_task_per_batch=True, distinct_targets=True)
    again = BatchPlan(pairs, 2, seed=3, one_task_per_batch=True, distinct_targets=True)
    batches = [plan.batch(s) for s in range(25)]
    assert batches == [again.batch(s) for s in range(25)]
    for batch in batches:
        assert len({pairs[i].task for i in batch}) == 1
        assert len({pairs[i].target for i in batch}) == len(batch)
    assert plan.position(plan._lengths[0]) == (1, 0)


def test_train_cli_config_errors(tmp_path):
    import io

    from wave_rt.cli import run

    cases = {
        "[modle]\npath = 'x'\n": "unknown config sections: modle",
        "[data]\ntrain = 'p.jsonl'\nbatch = 3\n": "[data]: unknown keys batch",
        "[data]\nbatch_size = 3\n": "[data] train: a manifest path is required",
        "[data]\ntrain = 'p.jsonl'\n[recipe]\nname = 'nope'\n": "unknown training recipe 'nope'",
        "[data\n": "not valid TOML",
    }
    (tmp_path / "p.jsonl").write_text(json.dumps({"query_text": "q", "target_text": "t"}) + "\n")
    for text, message in cases.items():
        cfg = tmp_path / "c.toml"
        cfg.write_text(text + "[run]\ndevice = 'cpu'\nout_dir = 'run'\n" if "[run]" not in text else text)
        err = io.StringIO()
        assert run(["train", str(cfg)], out=io.StringIO(), err=err) == 1, text
        assert message in err.getvalue(), (text, err.getvalue())
    err = io.StringIO()
    assert run(["train", str(tmp_path / "missing.toml")], err=err) == 1
    assert "does not exist" in err.getvalue()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_byte_order_mark_and_latin1_rows_in_pair_manifests(tmp_path, caplog, suffix):
    # Excel's "CSV UTF-8" starts with a byte-order mark (it used to stick to the first column's name); a row
    # saved as Latin-1 is skipped and named, the others train.
    texts = ["caf\u00e9 au lait", "caf\u00e9 cr\u00e8me", "plain tea"]
    if suffix == ".csv":
        lines = [b"query_text,target_text"] + [f"{t},caption {i}".encode() for i, t in enumerate(texts)]
    else:
        lines = [json.dumps({"query_text": t, "target_text": f"caption {i}"}, ensure_ascii=False).encode()
                 for i, t in enumerate(texts)]
    lines[-2] = lines[-2].decode().encode("latin-1")
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    skipped = Counter()
    pairs = load_pairs(path, skipped)
    assert [p.query.text for p in pairs] == [texts[0], texts[2]]
    assert skipped == Counter(bad_row=1) and "not valid UTF-8 (byte 0xe9)" in caplog.text


def test_every_row_of_a_task_trains_every_epoch_and_small_tasks_are_named(tmp_path, caplog):
    # WAVE's TypeAwareBatchSampler fills a task's last batch by wrapping around its own rows; a task with fewer
    # rows than one batch cannot fill a batch: it is left out, with a warning (it used to vanish silently).
    rows = [{"query_text": f"a{i}", "target_text": f"t{i}", "task": "a"} for i in range(10)]
    rows += [{"query_text": f"b{i}", "target_text": f"u{i}", "task": "b"} for i in range(3)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    plan = BatchPlan(pairs, 4, seed=1, one_task_per_batch=True)
    for epoch in range(3):
        batches = plan.epoch_batches(epoch)
        assert len(batches) == 3 and all(len(b) == 4 for b in batches)
        assert {pairs[i].task for b in batches for i in b} == {"a"}
        assert {i for b in batches for i in b} == set(range(10))  # every row of task a, every epoch
    assert plan.left_out == {"b": 3}
    assert "b: 3 rows" in caplog.text and "not trained" in caplog.text


def test_optimizer_defaults_and_schedule_follow_wave_and_transformers(tmp_path):
    # WAVE's scripts/train.sh: lr 2e-5, warmup_ratio 0.03, cosine (transformers' schedule, which starts at 0)
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from wave_rt.train.config import TrainConfig
    from wave_rt.train.trainer import warmup_cosine

    o = TrainConfig.from_dict({"data": {"train": "x.jsonl"}}).optim
    assert (o.lr, o.warmup_ratio, o.warmup(), o.weight_decay, o.grad_clip) == (2e-5, 0.03, 30, 0.0, 1.0)
    assert TrainConfig.from_dict({"data": {"train": "x"}, "optim": {"max_steps": 50}}).optim.warmup() == 2
    assert TrainConfig.from_dict({"data": {"train": "x"}, "optim": {"warmup_steps": 0}}).optim.warmup() == 0
    for warmup, total in ((1, 12), (2, 50), (0, 7), (30, 1000)):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        ref = get_cosine_schedule_with_warmup(opt, warmup, total)
        ours = warmup_cosine(warmup, total, 0.0)
        for step in range(total):
            assert abs(2e-5 * ours(step) - ref.get_last_lr()[0]) < 1e-12, (warmup, total, step)
            opt.step()
            ref.step()
