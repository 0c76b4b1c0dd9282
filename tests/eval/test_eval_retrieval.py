"""wave-rt eval: Recall@k and mAP in both directions against a brute-force full sort, grouping per modality
and task, shared captions as one target, QA accuracy, bad rows counted, and the CLI's table + JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lookup_encoder import LookupEncoder

from wave_rt.eval.retrieval import evaluate, ranking_metrics


def _brute(scores: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    out = {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP": 0.0}
    for row, rel in zip(scores, relevant):
        order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))
        ranks = [order.index(j) + 1 for j in rel]
        for k in (1, 5, 10):
            out[f"R@{k}"] += float(min(ranks) <= k)
        out["mAP"] += sum((i + 1) / r for i, r in enumerate(sorted(ranks))) / len(rel)
    return {k: v / len(relevant) for k, v in out.items()}


def test_ranking_metrics_match_brute_force():
    from wave_rt.kernels import similarity_topk

    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(23, 8, generator=g), torch.randn(17, 8, generator=g)
    relevant = [set(torch.randperm(17, generator=g)[: 1 + i % 3].tolist()) for i in range(23)]
    _, idx = similarity_topk(q, t, 17, normalize=True)
    got = ranking_metrics(idx, relevant)
    want = _brute(torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T, relevant)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_evaluate_groups_and_qa(tmp_path):
    import soundfile as sf

    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(tmp_path / name, np.zeros(1600, np.float32), 16000)
    e = np.eye(4).tolist()
    table = {"a.wav": e[0], "b.wav": e[1], "c.wav": [0.0, 0.9, 0.1, 0.0],  # c looks like b
             "cap A": e[0], "cap B": e[1], "q1": e[2], "cap Q": e[2], "other": e[3],
             "a.wav|which?": e[0], "yes": e[0], "no": e[3]}
    rows = [
        {"query_path": "a.wav", "target_text": "cap A", "task": "snd"},
        {"query_path": "b.wav", "target_text": "cap B", "task": "snd"},
        {"query_path": "c.wav", "target_text": "cap B", "task": "snd"},  # shares b's caption: one target
        {"query_text": "q1", "target_text": "cap Q", "task": "txt"},
        {"query_path": "a.wav", "question": "which?", "options": "no|yes", "answer": "B", "task": "qa"},
        {"query_path": "a.wav", "question": "which?", "options": ["yes", "no"], "answer": 1, "task": "qa"},
        {"query_path": "gone.wav", "target_text": "x"},
    ]
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate(manifest, encoder=LookupEncoder(table), qa_protocol="options")
    audio = report.groups["modality=audio"]
    assert audio["n"] == 3 and audio["targets"] == 2
    assert audio["q2t_R@1"] == 1.0 and audio["t2q_R@1"] == 1.0
    # cap B's relevant clips are b (rank 1) and c (rank 2): AP 1; cap A: a at rank 1
    assert audio["t2q_mAP"] == pytest.approx(1.0)
    assert report.groups["task=txt"]["q2t_R@1"] == 1.0
    assert report.groups["all"]["n"] == 4
    assert report.groups["task=qa"]["qa_acc"] == 0.5 and report.groups["task=qa"]["qa_n"] == 2
    assert report.skipped == {"bad_row": 1}
    assert "modality=audio" in report.table()


def test_cli_eval_writes_json(tmp_path, tiny_ckpt):
    from wave_rt.cli import run

    rows = [{"query_text": f"query {i}", "target_text": f"caption number {i}"} for i in range(5)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res" / "eval.json"
    import io

    buf = io.StringIO()
    assert run(["eval", str(manifest), "--model", str(tiny_ckpt), "--device", "cpu", "--json", str(out)], out=buf) == 0
    data = json.loads(out.read_text())
    assert data["groups"]["modality=text"]["n"] == 5
    assert 0.0 <= data["groups"]["all"]["q2t_R@1"] <= 1.0
    assert "q2t_R@1" in buf.getvalue()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny_checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval-ckpt"), recipe="all_layer", use_beats=False, layers=2)


def test_a_query_given_twice_is_one_query_relevant_to_both_targets(tmp_path):
    # one caption for two clips written as two rows (caption as the query): a perfect model scores 1, not the
    # 0.5 that per-row relevance capped it at; the same rows with the columns swapped score the same
    e = np.eye(3).tolist()
    table = {"a steady tone": e[0], "a.wav": e[0], "b.wav": [0.9, 0.1, 0.0], "a chord": e[2], "c.wav": e[2]}
    for name in ("a.wav", "b.wav", "c.wav"):
        (tmp_path / name).write_bytes(b"")
    rows = [{"query_text": "a steady tone", "target_path": "a.wav"}, {"query_text": "a steady tone", "target_path": "b.wav"},
            {"query_text": "a chord", "target_path": "c.wav"}]
    swapped = [{"query_path": r["target_path"], "target_text": r["query_text"]} for r in rows]
    reports = []
    for name, rs in (("q.jsonl", rows), ("t.jsonl", swapped)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
        reports.append(evaluate(tmp_path / name, encoder=LookupEncoder(table)).groups["all"])
    q, t = reports
    assert q["n"] == 2 and q["targets"] == 3 and t["n"] == 3 and t["targets"] == 2
    for k in ("R@1", "mAP"):
        assert q[f"q2t_{k}"] == t[f"t2q_{k}"] == 1.0 and q[f"t2q_{k}"] == t[f"q2t_{k}"] == 1.0


def test_qa_rows_are_asked_as_answer_asks_them(tmp_path, tiny_ckpt):
    # the default protocol is WAVE's and WaveEncoder.answer's: the question with lettered options, the letters
    # scored; each row is its own task, so its accuracy (0 or 1) says which letter eval chose
    import soundfile as sf

    from wave_rt.embed.encoder import WaveEncoder
    from wave_rt.items import Audio

    enc = WaveEncoder.from_pretrained(tiny_ckpt)
    t = np.arange(16000) / 16000
    questions = [("Which sound?", ["a low tone", "a high tone", "a chord"]), ("What is heard?", ["speech", "a tone"]),
                 ("Pitch?", ["high", "low", "none", "both"])]
    rows, want = [], {}
    for k, (question, options) in enumerate(questions):
        sf.write(tmp_path / f"{k}.wav", (0.3 * np.sin(2 * np.pi * (200 + 300 * k) * t)).astype(np.float32), 16000)
        for answer in range(len(options)):
            task = f"q{k}a{answer}"
            rows.append({"query_path": f"{k}.wav", "question": question, "options": options, "answer": answer,
                         "task": task})
            want[task] = float(enc.answer(Audio(str(tmp_path / f"{k}.wav")), question, options).choice == answer)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate(tmp_path / "qa.jsonl", encoder=enc)
    assert {task: report.groups[f"task={task}"]["qa_acc"] for task in want} == want
    assert report.groups["all"]["qa_n"] == len(rows)
    with pytest.raises(ValueError, match="QA protocol"):
        evaluate(tmp_path / "qa.jsonl", encoder=enc, qa_protocol="words")


def test_eval_batches_by_the_encoders_token_budget(tmp_path, tiny_ckpt, monkeypatch):
    # eval embedded fixed chunks of 32 items whatever their length: 32 long videos in one forward on a GPU
    from wave_rt.embed.encoder import WaveEncoder

    enc = WaveEncoder.from_pretrained(tiny_ckpt)
    monkeypatch.setattr(WaveEncoder, "default_max_batch_tokens", property(lambda self: 48))
    rows = [{"query_text": f"query number {i} " + "word " * (i % 9), "target_text": f"caption {i}"} for i in range(40)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real_stage = enc.stage
    monkeypatch.setattr(enc, "stage", lambda batch: calls.append([p.num_tokens for p in batch]) or real_stage(batch))
    report = evaluate(tmp_path / "m.jsonl", encoder=enc)
    assert report.groups["all"]["n"] == 40
    tokens = sum if enc.packed else (lambda c: len(c) * max(c))
    assert len(calls) > 2 and all(len(c) == 1 or tokens(c) <= 48 for c in calls), calls
