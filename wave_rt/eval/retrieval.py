"""Retrieval and QA metrics over a pair manifest: Recall@1/5/10 and mAP in both directions, QA accuracy,
per query modality and per task, scored with wave_rt.kernels.similarity_topk.

Rows are the training manifest's pairs (wave_rt.train.data). A row with `options` (a list, or a string
split on "|") and `answer` (0-based index or letter) is a QA row, asked as WaveEncoder.answer asks it (WAVE's
protocol, `qa_protocol="letters"`): the query is embedded with the question (`question`, else
`instruction`), its lettered options and the QA suffix as instruction, the option letters as text targets,
and it is right when the closest letter is the answer's. `qa_protocol="options"` asks the bare question and
scores the options' own texts instead (MMEB's candidate texts). `answer` may also be the exact text of one
option (a digit or a letter that also equals the text of another option is ambiguous: the row is skipped).
Other rows are retrieval pairs. A manifest none of whose rows can be used is an EvalManifestError, not an
empty report.

Relevance: queries with the same content and instruction, and targets with the same content (same caption
text or same file), are one entry each, relevant to every counterpart of their rows: a caption shared by two
clips makes both clips relevant to it, and a clip with five captions is relevant to each. R@k is the hit rate
(at least one relevant item in the top k: the AudioCaps / Clotho convention; trec_eval's recall@k, the
fraction of relevant items found, is not reported). n counts unique queries. mAP is computed from the top
min(N, 1024) results (similarity_topk's limit; mAP@1024 equals full mAP when every relevant item ranks
within 1024).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wave_rt.embed.processor import QA_PROTOCOLS
from wave_rt.errors import InputError, MediaError, WaveRTError
from wave_rt.kernels import similarity_topk
from wave_rt.train.data import (
    Pair,
    PairRowError,
    answer_index,
    parse_options,
    parse_side,
    read_rows,
    target_key,
)

log = logging.getLogger(__name__)

KS = (1, 5, 10)
MAX_K = 1024
EXPECTED_COLUMNS = ("query_text or query_path (+ query_modality), and target_text or target_path (+ target_modality); "
                    "QA rows: a query, options and answer (+ question)")


class EvalManifestError(WaveRTError, ValueError):
    """An eval manifest gives nothing to evaluate (every row skipped, or every item failed to embed)."""

    def __init__(self, manifest: object, reason: str) -> None:
        self.manifest, self.reason = str(manifest), reason
        super().__init__(f"{self.manifest}: {reason}")


@dataclass
class QARow:
    row: int
    query: Any
    question: str
    options: list[str]
    answer: int
    task: str
    modality: str


@dataclass
class EvalReport:
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    model: str = ""
    manifest: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "manifest": self.manifest, "groups": self.groups, "skipped": self.skipped}

    def table(self) -> str:
        cols = ["n", "q2t_R@1", "q2t_R@5", "q2t_R@10", "q2t_mAP", "t2q_R@1", "t2q_R@5", "t2q_R@10", "t2q_mAP",
                "qa_acc"]
        lines = [f"{'group':24}" + "".join(f"{c:>10}" for c in cols)]
        for name, g in self.groups.items():
            cells = []
            for c in cols:
                v = g.get(c)
                cells.append(f"{'-':>10}" if v is None else (f"{v:>10d}" if isinstance(v, int) else f"{v:>10.4f}"))
            lines.append(f"{name:24}" + "".join(cells))
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        return "\n".join(lines)


def load_eval_rows(manifest: str | Path, skipped: Counter) -> tuple[list[Pair], list[QARow]]:
    manifest = Path(manifest)
    pairs: list[Pair] = []
    qa: list[QARow] = []
    reasons: dict[str, list[int]] = {}  # skip reason -> its rows, for the error when nothing is usable
    rows = read_rows(manifest)
    for n, row in enumerate(rows):
        try:
            if "__error__" in row:
                raise ValueError(row["__error__"])
            query, modality = parse_side(row, "query", manifest.parent)
            task = str(row.get("task") or "")
            options = row.get("options")
            if options not in (None, ""):
                opts = parse_options(options)
                idx = answer_index(row.get("answer"), opts)
                question = str(row.get("question") or row.get("instruction") or "")
                qa.append(QARow(n, query, question, opts, idx, task, modality))
                continue
            target, _ = parse_side(row, "target", manifest.parent)
            pairs.append(Pair(n, query, target, row.get("instruction") or None, task, str(row.get("id") or n),
                              modality))
        except (ValueError, TypeError) as exc:
            log.warning("skipping %s", PairRowError(manifest, n, str(exc)))
            skipped["bad_row"] += 1
            reasons.setdefault(str(exc), []).append(n)
    if not pairs and not qa:
        first = "; ".join(f"row {r[0]}{f' (+{len(r) - 1} like it)' if len(r) > 1 else ''}: {why}"
                          for why, r in list(reasons.items())[:3])
        raise EvalManifestError(manifest, f"no usable pair rows ({len(rows)} rows, all skipped); expected columns: "
                                f"{EXPECTED_COLUMNS}" + (f"; first skip reasons: {first}" if first else ""))
    return pairs, qa


def _embed(encoder: Any, items: Sequence[Any], instructions: Sequence[str | None], skipped: Counter
           ) -> tuple[torch.Tensor, list[bool]]:
    """Unit vectors of the items that prepare; ok[i] False for the ones that failed (counted, logged). Batched
    by the encoder's token budget, with its out-of-memory splitting."""
    prepared, ok = [], []
    for i, (item, instr) in enumerate(zip(items, instructions)):
        try:
            prepared.append(encoder.prepare(item, instr, index=i))
            ok.append(True)
        except (MediaError, InputError) as exc:
            log.warning("eval: skipping item %d: %s", i, exc)
            skipped["media" if isinstance(exc, MediaError) else "input"] += 1
            ok.append(False)
    if not prepared:
        return torch.empty(0, encoder.dim), ok
    return encoder.embed_prepared_all(prepared), ok


def ranking_metrics(scores_idx: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    """R@k (hit rate: at least one relevant item in the top k, the AudioCaps / Clotho convention, which
    sentence-transformers calls accuracy@k) and mAP (trec_eval's AP: over every relevant item) from top-k
    indices [n, K] and each query's relevant set."""
    out = {f"R@{k}": 0.0 for k in KS}
    ap_sum = 0.0
    for row, rel in zip(scores_idx.tolist(), relevant):
        hits = 0
        ap = 0.0
        first = None
        for rank, j in enumerate(row, 1):
            if j in rel:
                hits += 1
                ap += hits / rank
                first = first or rank
        ap_sum += ap / len(rel)
        for k in KS:
            out[f"R@{k}"] += 1.0 if first is not None and first <= k else 0.0
    n = max(1, len(relevant))
    out = {k: v / n for k, v in out.items()}
    out["mAP"] = ap_sum / n
    return out


def _retrieval(q: torch.Tensor, t: torch.Tensor, relevant: list[set[int]]) -> dict[str, Any]:
    """q [n, D] unique queries, t [m, D] unique targets, relevant[i] = the targets of query i's rows."""
    k = min(t.shape[0], MAX_K)
    _, idx = similarity_topk(q, t, k, normalize=True)
    q2t = ranking_metrics(idx, relevant)
    queries_of: dict[int, set[int]] = defaultdict(set)
    for i, targets in enumerate(relevant):
        for j in targets:
            queries_of[j].add(i)
    k2 = min(q.shape[0], MAX_K)
    _, idx2 = similarity_topk(t, q, k2, normalize=True)
    t2q = ranking_metrics(idx2, [queries_of[j] for j in range(t.shape[0])])
    out: dict[str, Any] = {"n": int(q.shape[0]), "targets": int(t.shape[0])}
    out.update({f"q2t_{k}": v for k, v in q2t.items()})
    out.update({f"t2q_{k}": v for k, v in t2q.items()})
    return out


def _unique(keys: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(index of each key's unique entry, the first position of every unique key)."""
    seen: dict[Any, int] = {}
    first: list[int] = []
    of = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        of.append(seen[key])
    return of, first


def evaluate(manifest: str | Path, model: Any = None, *, device: str | None = None,
             encoder: Any = None, qa_protocol: str = "letters") -> EvalReport:
    """Metrics of `model` (a checkpoint path, "demo", or a ready WaveEncoder as `encoder`) on `manifest`.
    `qa_protocol` ("letters" or "options") says how QA rows are asked and scored (WaveProcessor.qa_prompt)."""
    if qa_protocol not in QA_PROTOCOLS:
        raise ValueError(f"unknown QA protocol {qa_protocol!r}: one of {QA_PROTOCOLS}")
    if encoder is None:
        from wave_rt.embed.encoder import WaveEncoder

        encoder = WaveEncoder.from_pretrained(model, device=device)
    skipped: Counter = Counter()
    pairs, qa = load_eval_rows(manifest, skipped)
    report = EvalReport(model=str(model if model is not None else encoder.model_id), manifest=str(manifest))

    if pairs:
        # A query or target given twice (a caption shared by two clips, a clip with five captions) is one
        # entry, relevant to every counterpart of its rows.
        q_of, q_first = _unique([(target_key(p.query), p.instruction) for p in pairs])
        t_of, t_first = _unique([target_key(p.target) for p in pairs])
        qv, qok = _embed(encoder, [pairs[i].query for i in q_first], [pairs[i].instruction for i in q_first],
                         skipped)
        tv, tok = _embed(encoder, [pairs[i].target for i in t_first], [None] * len(t_first), skipped)
        q_row = {u: n for n, u in enumerate(u for u, good in enumerate(qok) if good)}  # unique -> row in qv
        t_row = {u: n for n, u in enumerate(u for u, good in enumerate(tok) if good)}
        kept = [i for i in range(len(pairs)) if q_of[i] in q_row and t_of[i] in t_row]
        groups: dict[str, list[int]] = defaultdict(list)
        for i in kept:
            groups["all"].append(i)
            groups[f"modality={pairs[i].modality}"].append(i)
            if pairs[i].task:
                groups[f"task={pairs[i].task}"].append(i)
        for name, rows in groups.items():
            # The pool of a group is the targets of its own rows (text->audio among audio clips, ...).
            queries = sorted({q_of[i] for i in rows})
            pool = sorted({t_of[i] for i in rows})
            qpos, tpos = {u: n for n, u in enumerate(queries)}, {u: n for n, u in enumerate(pool)}
            relevant: list[set[int]] = [set() for _ in queries]
            for i in rows:
                relevant[qpos[q_of[i]]].add(tpos[t_of[i]])
            report.groups[name] = _retrieval(qv[[q_row[u] for u in queries]], tv[[t_row[u] for u in pool]],
                                             relevant)

    if qa:
        asked = [encoder.processor.qa_prompt(r.question, r.options, qa_protocol) for r in qa]
        qvec, qok = _embed(encoder, [r.query for r in qa], [instr for instr, _ in asked], skipped)
        texts = sorted({t for _, scored in asked for t in scored})
        tvec, tok = _embed(encoder, texts, [None] * len(texts), skipped)
        t_row = {t: n for n, t in enumerate(t for t, good in zip(texts, tok) if good)}
        correct: dict[str, list[int]] = defaultdict(list)
        n_ok = 0
        for r, (_, scored), good in zip(qa, asked, qok):
            if not good:
                continue
            row = qvec[n_ok]
            n_ok += 1
            if not all(t in t_row for t in scored):  # a missing option would shift the indices compared
                continue
            best = int((row @ tvec[[t_row[t] for t in scored]].T).argmax())
            for g in ("all", f"modality={r.modality}") + ((f"task={r.task}",) if r.task else ()):
                correct[g].append(int(best == r.answer))
        for g, hits in correct.items():
            report.groups.setdefault(g, {})["qa_acc"] = sum(hits) / len(hits)
            report.groups[g]["qa_n"] = len(hits)
    report.skipped = dict(skipped)
    if not report.groups:
        raise EvalManifestError(manifest, "no row could be evaluated: every usable row had a query or target that "
                                f"failed to prepare (skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}"
                                "; the log names each)")
    return report
