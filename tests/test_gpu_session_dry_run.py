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


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import statement in a script, at any depth (the 7B-only branches import inside functions)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names if a.name != "*"]))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
    return out


def test_every_import_in_the_bench_scripts_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run stops before a script's heavy imports, so a module moved out of the package (it happened:
    wave_rt.model.presets -> bench/presets.py) broke three GPU stages on a lent machine. Here every import of
    every bench script, nested ones included, must resolve; an optional dependency that is not installed here
    (DALI, TensorRT, FAISS, ...) is the only exception."""
    import importlib
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.syspath_prepend(str(ROOT / "bench" / "kernels"))
    scripts = sorted((ROOT / "bench").rglob("*.py"))
    assert len(scripts) > 10, scripts
    bad, checked = [], 0
    for script in scripts:
        for line, module, names in _imports(script):
            top = module.split(".")[0]
            if importlib.util.find_spec(top) is None:
                continue
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                bad.append(f"{script.relative_to(ROOT)}:{line}: import {module}: {e}")
                continue
            checked += 1
            for name in names:
                if not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ImportError:
                        bad.append(f"{script.relative_to(ROOT)}:{line}: {module} has no {name}")
    assert checked > 50, checked
    assert not bad, "\n".join(bad)


def test_bench_export_runs_end_to_end_on_the_small_config(tmp_path: Path) -> None:
    """The export stage's script for real on the small config (eager only, a few iterations): the code between
    the dry run's exit and the measurement (the workload, the model build) once broke on a lent GPU."""
    out = tmp_path / "lat.json"
    proc = subprocess.run([sys.executable, "bench/bench_export.py", "--config", "small", "--backends", "eager",
                           "--iters", "2", "--warmup", "1", "--items", "2", "--batch-sizes", "1", "--threads", "1",
                           "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc["latency"]["eager"]) == {"text", "audio"}, doc["latency"]
    assert all(v["n"] == 2 and v["p50_ms"] > 0 for v in doc["latency"]["eager"].values()), doc["latency"]


def test_tests_stage_covers_every_gpu_test_folder() -> None:
    """The tests stage names its folders (so the kernels, whose autotuning is slow, run last): a GPU test in
    a folder it does not name would never run on a lent GPU."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line and line.startswith("tests/")}
    assert len(files) >= 5, proc.stdout[-2000:]
    stage = (ROOT / "bench/gpu_stages/tests.sh").read_text()
    named = {w.rstrip("\\") for w in stage.split() if w.startswith("tests")}
    missing = {f for f in files if not any(f == n or f.startswith(n.rstrip("/") + "/") for n in named)}
    assert not missing, missing
