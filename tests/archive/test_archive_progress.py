"""The job's own clock: when the forwards ran, and how the summary reports it."""

from __future__ import annotations

import io

import pytest

from wave_rt.archive import progress as progress_mod
from wave_rt.archive.progress import JobSummary, Progress


def test_overlapping_forwards_count_once_in_the_models_running_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    prog = Progress(total=4, stream=io.StringIO(), enabled=False)

    def at(t: float) -> None:
        now[0] = 100.0 + t

    at(2.0)
    a = prog.forward_started()  # two model threads: a runs 2..5, b runs 4..6, then c alone 8..9
    at(4.0)
    b = prog.forward_started()
    at(5.0)
    prog.forward_ended(a)
    at(6.0)
    prog.forward_ended(b)
    at(8.0)
    c = prog.forward_started()
    at(9.0)
    prog.forward_ended(c)
    assert prog.first_forward_at == 2.0 and prog.last_forward_end_at == 9.0
    assert prog.model_active_seconds == pytest.approx(5.0)  # 2..6 and 8..9, not 3 + 2 + 1
    assert prog.stage_seconds["model"] == pytest.approx(6.0)  # busy time summed over threads, as for every stage


def test_summary_table_shows_the_model_timeline() -> None:
    s = JobSummary(source="src", out_dir="out", engine="local", embedded=4, wall_seconds=10.0, setup_seconds=1.0,
                   first_forward_at=2.0, last_forward_end_at=9.0, model_active_seconds=5.0)
    line = next(x for x in s.table().splitlines() if "model timeline" in x)
    assert "first forward after 2.0s" in line and "running 5.0s of the 7.0s" in line and "(71%)" in line
    assert "1.0s after" in line
    assert "model timeline" not in JobSummary(source="s", out_dir="o", engine="ray", embedded=1,
                                               wall_seconds=1.0).table()
