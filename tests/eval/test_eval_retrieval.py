"""wave-rt eval: Recall@k and mAP in both directions against a brute-force full sort, grouping per modality
and task, shared captions as one target, QA accuracy, bad rows counted, and the CLI's table + JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wave_rt.eval.retrieval import evaluate, ranking_metrics
from wave_rt.items import Text


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


class LookupEncoder:
    """Embeds by name: item i's vector is table[name]; lets the metrics be checked against known answers."""

    dim = 4
    model_id = "lookup"

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def prepare(self, item, instruction=None, index=None):
        key = item.text if isinstance(item, Text) else item if isinstance(item, str) else str(item.source)
        if instruction:
            key = f"{key}|{instruction}"
        return torch.tensor(self.table[key.split("/")[-1]], dtype=torch.float32)

    def embed_prepared(self, batch):
        return torch.nn.functional.normalize(torch.stack(list(batch)), dim=-1)


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
    report = evaluate(manifest, encoder=LookupEncoder(table))
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
