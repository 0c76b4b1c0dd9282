"""wave-rt eval on manifests that give nothing to evaluate is a typed error (the CLI: one line, exit 1), not an
empty table; a QA answer may be an index, a letter or the exact text of one option, and anything else or
ambiguous is a skipped row whose reason names it."""

from __future__ import annotations

import io
import json
import logging

import pytest
from lookup_encoder import LookupEncoder

from wave_rt.eval.retrieval import EvalManifestError, answer_index, evaluate


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_embed_style_manifest_is_a_typed_error_naming_columns_and_reasons(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,text\nt1,,a red circle\nt2,,a pure tone\n")
    with pytest.raises(EvalManifestError) as info:
        evaluate(manifest, encoder=LookupEncoder({}))
    message = str(info.value)
    assert message.startswith(f"{manifest}: no usable pair rows (2 rows, all skipped)")
    assert "query_text or query_path" in message and "target_text or target_path" in message
    assert "row 0 (+1 like it): needs exactly one of query_text and query_path" in message


def test_cli_eval_with_no_usable_row_exits_1_in_one_line(tmp_path):
    from wave_rt.cli import run

    manifest = _write(tmp_path / "m.jsonl", [{"path": "a.wav"}, {"text": "x"}])
    out, err = io.StringIO(), io.StringIO()
    logging.getLogger("wave_rt").setLevel(logging.ERROR)  # the per-row warnings are not the point here
    try:
        assert run(["eval", str(manifest), "--device", "cpu"], out=out, err=err) == 1
    finally:
        logging.getLogger("wave_rt").setLevel(logging.NOTSET)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("wave-rt eval: error:")]
    assert len(lines) == 1 and "no usable pair rows" in lines[0] and str(manifest) in lines[0]
    assert "Traceback" not in err.getvalue() and "group" not in out.getvalue()


def test_rows_that_all_fail_to_embed_are_a_typed_error(tmp_path):
    manifest = _write(tmp_path / "m.jsonl", [{"query_text": "q1", "target_text": "unknown caption"}])
    with pytest.raises(EvalManifestError, match="no row could be evaluated.*input=1"):
        evaluate(manifest, encoder=LookupEncoder({"q1": [1.0, 0.0, 0.0]}))


@pytest.mark.parametrize(("answer", "options", "want"), [
    (1, ["yes", "no"], 1), ("1", ["yes", "no"], 1), ("b", ["yes", "no"], 1), ("B", ["yes", "no"], 1),
    ("no", ["yes", "no"], 1), ("a dog barking", ["a tone", "a dog barking"], 1),
    ("B", ["A", "B", "C"], 1),  # letter and text agree
    ("12", ["3", "12"], 1),  # out of range as an index, the text of option 1
    (1.0, ["yes", "no"], 1),
])
def test_answer_forms(answer, options, want):
    assert answer_index(answer, options) == want


@pytest.mark.parametrize(("answer", "options", "why"), [
    ("maybe", ["yes", "no"], "not one of the 2 options"),
    ("A", ["x", "A"], "ambiguous"),  # letter A = option 0, text = option 1
    ("1", ["1", "2", "3"], "ambiguous"),  # index 1 = "2", text = option 0
    ("same", ["same", "same"], "several options"),
    (5, ["yes", "no"], "not one of the 2 options"),
    (True, ["yes", "no"], "not an option index"),
    (None, ["yes", "no"], "not an option index"),
])
def test_bad_answers_raise_a_reason(answer, options, why):
    with pytest.raises(ValueError, match=why):
        answer_index(answer, options)


def test_qa_answer_as_option_text_is_scored_and_bad_ones_are_named(tmp_path, caplog):
    table = {"q1": [1.0, 0.0, 0.0], "cap": [1.0, 0.0, 0.0], "a tone": [1.0, 0.0, 0.0], "speech": [0.0, 1.0, 0.0]}
    rows = [
        {"query_text": "q1", "target_text": "cap"},
        {"query_text": "q1", "question": "which?", "options": "speech|a tone", "answer": "a tone", "task": "qa"},
        {"query_text": "q1", "question": "which?", "options": ["a tone", "speech"], "answer": "speech", "task": "qa"},
        {"query_text": "q1", "question": "which?", "options": "a tone|speech", "answer": "music", "task": "qa"},
    ]
    manifest = _write(tmp_path / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        report = evaluate(manifest, encoder=LookupEncoder(table), qa_protocol="options")
    assert report.groups["task=qa"]["qa_n"] == 2 and report.groups["task=qa"]["qa_acc"] == 0.5
    assert report.skipped == {"bad_row": 1}
    assert f"{manifest} row 3: answer 'music' is not one of the 2 options" in caplog.text
