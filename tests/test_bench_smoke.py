"""Each GPU stage's script run for real on its small config on the CPU, into a temporary results folder
(WAVE_RT_RESULTS): the dry run stops before a script's imports and model code, and on a lent H200 three 7B
stages died there (a moved module, a changed dataclass) and took their share of the 15 minutes with them.
Timings here are not claims; the checks are that each script finishes and writes complete, non-empty rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "model": (["bench/bench_model.py", "--config", "small", "--repeats", "1", "--no-reference",
               "--modalities", "text,audio"], "model_small_cpu_text_audio.json"),
    "features": (["bench/bench_features.py", "--config", "small", "--repeats", "1"], "features_small_cpu.json"),
    "presets": (["bench/bench_presets.py", "--config", "small", "--repeats", "1", "--presets", "lco-omni,alm2vec"],
                "presets_small_cpu.json"),
    "train": (["bench/bench_train.py", "--config", "tiny", "--batches", "8", "--chunk", "4", "--repeats", "1",
               "--threads", "1", "--max-batch", "16"], "train_tiny_cpu.json"),
    "search": (["bench/bench_search.py", "--smoke", "--n", "2000", "--dim", "32", "--queries", "1",
                "--target-s", "0.05"], "search_cpu_smoke.json"),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_gpu_stage_script_runs_on_the_small_config(name: str, tmp_path: Path) -> None:
    args, result = SCRIPTS[name]
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*.json")}
    env = {**os.environ, "WAVE_RT_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / result).read_text())
    assert doc.get("partial") in (None, False), doc.get("partial")
    rows = doc["rows"]
    assert rows and all("case" in r and "value" in r for r in rows), rows
    # the committed results are untouched: the scripts wrote into WAVE_RT_RESULTS
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*.json")} == committed
