"""bench/gpu_session.sh --dry-run: every stage's command line is accepted by its script, its inputs exist and its
output paths are writable, so that a lent GPU's minutes never go to a typo (issue 15)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_checks_every_stage(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout, proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "work" / "session.jsonl").read_text().splitlines()]
    ran = [x for x in lines if "rc" in x]
    stages = {x["stage"] for x in lines}
    # every stage of the plan is either checked or skipped with its reason, never silently absent
    order = next(ln for ln in (ROOT / "bench/gpu_session.sh").read_text().splitlines() if ln.startswith("ORDER="))
    assert stages == set(order.split("(")[1].rstrip(")").split()), stages
    assert ran and all(x["dry_run"] and x["rc"] == 0 for x in ran), ran
    for x in lines:
        if "skipped" in x:
            assert not (ROOT / f"bench/gpu_stages/{x['stage']}.sh").exists(), x
    with tarfile.open(tmp_path / "out" / "gpu_session.tgz") as tar:
        assert "./session.jsonl" in tar.getnames()


def test_dry_run_fails_on_a_bad_command_line(tmp_path: Path) -> None:
    stage = ROOT / "bench/gpu_stages/zz_broken_for_test.sh"
    stage.write_text("stage_zzbroken() { step 10 -- $PY bench/bench_model.py --no-such-option; }\n")
    try:
        env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
               "PYTHON": sys.executable}
        proc = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run", "zzbroken"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        stage.unlink()
    assert proc.returncode != 0
    assert "FAIL" in proc.stdout
