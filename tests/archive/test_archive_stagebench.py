"""bench/stagebench.py: per-stage times of the archive job on a sample of real files with the demo model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from archive_helpers import BAD_MEDIA, GOOD_MEDIA, REPO, make_media_archive


def _stagebench():
    spec = importlib.util.spec_from_file_location("stagebench", REPO / "bench" / "stagebench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stagebench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_archive_stagebench_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _stagebench().main
    media = make_media_archive(tmp_path / "media")
    report_path = tmp_path / "report.json"
    assert run([str(media), "--sample", "50", "--json", str(report_path)]) == 0
    table = capsys.readouterr().out
    for stage in ("read", "decode", "preprocess", "model", "write"):
        assert f"  {stage} " in table
    assert table.count("<- bottleneck") == 1 and "end to end (overlapped)" in table

    rep = json.loads(report_path.read_text())
    assert rep["sample"] == len(GOOD_MEDIA) + len(BAD_MEDIA) and rep["failed"] == len(BAD_MEDIA)
    assert rep["modalities"] == {"audio": 5, "av": 1, "video": 1}
    assert len(rep["tokens"]) == len(GOOD_MEDIA) and min(rep["tokens"]) > 0
    assert list(rep["stages"]) == ["read", "decode", "preprocess", "model", "write"]
    for name, st in rep["stages"].items():
        assert st["items"] == len(GOOD_MEDIA) and st["seconds"] >= 0, name
    assert rep["stages"]["decode"]["seconds"] > 0 and rep["stages"]["model"]["seconds"] > 0
    assert rep["bottleneck"] in rep["stages"]
    assert rep["pipeline_items"] == len(GOOD_MEDIA) and rep["pipeline_items_per_s"] > 0
    assert rep["media_seconds"] > 5.0  # seven clips of 0.7 to 2 s

    # the first N items of the walk only (sorted: bad/ first, then speech/hello.wav)
    assert run([str(media), "--sample", "5", "--json", str(report_path)]) == 0
    capsys.readouterr()
    rep = json.loads(report_path.read_text())
    assert rep["sample"] == 5 and rep["failed"] == 4 and rep["modalities"] == {"audio": 1}
    assert run([str(media), "--sample", "2"]) == 1
    assert "every sampled item failed to decode" in capsys.readouterr().err
    assert run([str(media), "--sample", "0"]) == 1
    assert "sample must be positive" in capsys.readouterr().err
