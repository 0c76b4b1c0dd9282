"""Rows with explicit negatives (WAVE's `neg_text`, e.g. a QA row's wrong options): each query is trained
against its own target and negatives only (cross-entropy, the target as the class, one direction; WAVE's
`give_neg` batches), in batches of such rows; GradCache gives the full-batch gradients; a QA manifest trains
end to end."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_gradcache import _setup
from train_helpers import train_config

from wave_rt.items import Text
from wave_rt.train.data import BatchPlan, load_pairs
from wave_rt.train.encode import embed_items
from wave_rt.train.gradcache import chunked, full_batch_step, gradcache_step
from wave_rt.train.objective import ContrastiveLoss


def options_reference(q: torch.Tensor, c: torch.Tensor, groups: list[int], t: torch.Tensor | float) -> torch.Tensor:
    """Row by row, as WAVE's loop over unequal option counts: CE of q_i against its own candidates."""
    total, start = q.new_zeros(()), 0
    for i, g in enumerate(groups):
        logits = (c[start:start + g] @ q[i]) / t
        total = total - torch.log_softmax(logits, dim=0)[0]
        start += g
    return total / len(groups)


@pytest.mark.parametrize("learnable", [False, True])
def test_options_loss_and_gradients_match_the_row_by_row_definition(learnable):
    torch.manual_seed(0)
    groups = [4, 2, 5, 1, 3]
    q = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(sum(groups), 8, dtype=torch.float64), dim=-1).requires_grad_()
    loss = ContrastiveLoss(0.05, learnable_temperature=learnable).double()
    ours = loss.options(q, c, groups)
    ref = options_reference(q, c, groups, loss.temperature(torch.float64))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    params = [q, c] + list(loss.parameters())
    for a, b in zip(torch.autograd.grad(ours, params, retain_graph=True), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        loss.options(q, c, [4, 2, 5, 1, 2])


def test_negatives_columns_and_bad_rows(tmp_path, caplog):
    rows = [
        {"query_text": "which bird?", "target_text": "B", "negatives": ["A", "C", "D"], "task": "qa"},
        {"query_text": "which car?", "target_text": "A", "neg_text": ["B"], "task": "qa"},  # WAVE's column name
        {"query_text": "plain", "target_text": "a caption"},
        {"query_text": "x", "target_text": "B", "negatives": ["B", "C"]},  # the target among its negatives
        {"query_text": "x", "target_path": "a.wav", "negatives": ["C"]},  # negatives compete with a text target
        {"query_text": "x", "target_text": "B", "negatives": ["", "C"]},
        {"query_text": "x", "target_text": "B", "negatives": ["C"], "neg_text": ["D"]},
    ]
    (tmp_path / "a.wav").write_bytes(b"")
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = Counter()
    pairs = load_pairs(path, skipped)
    assert [(p.target, p.negatives) for p in pairs] == [("B", ("A", "C", "D")), ("A", ("B",)), ("a caption", ())]
    assert skipped["bad_row"] == 4
    for reason in ("holds the target itself", "must be target_text", "non-empty texts", "not both"):
        assert reason in caplog.text, reason
    csv = tmp_path / "m.csv"
    csv.write_text('query_text,target_text,negatives\nq1,B,A|C|D\nq2,A,"[""B"", ""C""]"\n')
    assert [p.negatives for p in load_pairs(csv)] == [("A", "C", "D"), ("B", "C")]


def test_rows_with_negatives_never_share_a_batch_with_plain_pairs(tmp_path):
    rows = [{"query_text": f"q{i}", "target_text": f"t{i}"} for i in range(8)]
    rows += [{"query_text": f"qa{i}", "target_text": "A", "negatives": ["B", "C"]} for i in range(8)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    plan = BatchPlan(pairs, 4, seed=0, one_task_per_batch=False)
    for epoch in range(3):
        for batch in plan.epoch_batches(epoch):
            assert len({bool(pairs[i].negatives) for i in batch}) == 1


@pytest.mark.parametrize("chunk", [1, 3])
def test_gradcache_equals_the_full_batch_on_rows_with_negatives(tiny_ckpts, chunk):
    model, loss, prepared, pad, names = _setup(tiny_ckpts, "wave")
    queries, targets = prepared
    groups = [1 + (i % 3) for i in range(len(queries))]  # the target plus 0-2 negatives (other rows' targets)
    candidates = []
    for i, g in enumerate(groups):
        candidates += [targets[i]] + [targets[(i + j) % len(targets)] for j in range(1, g)]

    def loss_fn(q, c):
        return loss.options(q, c, groups)

    def run(step, chunk_size):
        for p in list(model.parameters()) + list(loss.parameters()):
            p.grad = None
        torch.manual_seed(0)
        value = step(lambda items: embed_items(model, items, pad), [chunked(queries, chunk_size),
                                                                    chunked(candidates, chunk_size)], loss_fn)
        return value, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, g_full = run(full_batch_step, len(candidates))
    cached, g_cached = run(gradcache_step, chunk)
    torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-12)
    assert g_full.keys() == g_cached.keys() and names
    for n in g_full:
        torch.testing.assert_close(g_cached[n], g_full[n], rtol=1e-8, atol=1e-12, msg=n)


def test_a_qa_manifest_trains_end_to_end(tiny_ckpts, tmp_path, monkeypatch):
    from wave_rt.train.trainer import fit

    calls = Counter()
    real_options, real_forward = ContrastiveLoss.options, ContrastiveLoss.forward

    def options(self, q, c, groups):
        calls["options"] += 1
        assert c.shape[0] == 4 * q.shape[0] and list(groups) == [4] * q.shape[0]  # target + 3 wrong letters
        return real_options(self, q, c, groups)

    def forward(self, q, d):
        calls["in-batch"] += 1
        return real_forward(self, q, d)

    monkeypatch.setattr(ContrastiveLoss, "options", options)
    monkeypatch.setattr(ContrastiveLoss, "forward", forward)

    rows = [{"query_text": f"question {i}: which letter?", "target_text": "ABCD"[i % 4],
             "negatives": [x for x in "ABCD" if x != "ABCD"[i % 4]], "task": "qa"} for i in range(12)]
    rows += [{"query_text": f"caption query {i}", "target_text": f"caption {i}", "task": "retrieval"} for i in range(12)]
    manifest = tmp_path / "qa.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp_path / "run",
                       data={"batch_size": 4, "chunk_size": 3}, optim={"max_steps": 6},
                       recipe={"one_task_per_batch": True})
    result = fit(cfg)
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    # both kinds of batch ran, each with its own loss (chunks of 3 of 4 rows: GradCache, one loss call a step)
    assert calls["options"] > 0 and calls["in-batch"] > 0 and calls["options"] + calls["in-batch"] == 6


def test_qa_rows_in_the_eval_format_become_pairs_with_negatives(tmp_path, caplog):
    # the rows `wave-rt eval` scores (options, answer, question) train as it scores them: the question as the
    # query's instruction, the answer's option as the target, the other options against it
    rows = [
        {"query_text": "clip 1", "question": "Which animal?", "options": ["dog", "cat", "cow"], "answer": "B"},
        {"query_text": "clip 2", "instruction": "Which sound?", "options": "rain|wind", "answer": 0},
        {"query_text": "clip 3", "options": ["a", "b"], "answer": "b", "target_text": "a"},  # two targets
        {"query_text": "clip 4", "options": ["only"], "answer": 0},
        {"query_text": "clip 5", "options": ["x", "y", "x"], "answer": 0},
        {"query_text": "clip 6", "options": ["x", "y"], "answer": "Z"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = Counter()
    pairs = load_pairs(path, skipped)
    assert [(p.instruction, p.target, p.negatives) for p in pairs] == [
        ("Which animal?", "cat", ("dog", "cow")), ("Which sound?", "rain", ("wind",))]
    assert skipped["bad_row"] == 4
    for reason in ("leave target_text", "two or more", "appears more than once", "not one of the 2 options"):
        assert reason in caplog.text, reason


@pytest.mark.parametrize("protocol", ["letters", "options"])
def test_qa_rows_train_as_eval_asks_them(tmp_path, protocol):
    # PairSource prepares an eval-format QA row by the QA protocol eval scores it with (default: WAVE's letters)
    from wave_rt.embed.encoder import WaveEncoder
    from wave_rt.train.data import PairSource

    rows = [{"query_text": "clip 1", "question": "Which animal?", "options": ["dog", "cat", "cow"], "answer": "B"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = WaveEncoder.from_pretrained("demo").processor
    query, target, negatives = PairSource(load_pairs(path), processor, qa_protocol=protocol).prepare(0)
    instruction, scored = processor.qa_prompt("Which animal?", ["dog", "cat", "cow"], protocol)
    assert scored == (["A", "B", "C"] if protocol == "letters" else ["dog", "cat", "cow"])
    want = [processor.prepare(x) for x in (scored[1], scored[0], scored[2])]
    assert torch.equal(query.inputs.input_ids,
                       processor.prepare(Text("clip 1", side="query"), instruction).inputs.input_ids)
    for got, w in zip((target, *negatives), want):
        assert torch.equal(got.inputs.input_ids, w.inputs.input_ids)
