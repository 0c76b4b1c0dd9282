"""bench/report.py renders results JSON into Markdown tables and PNG plots, from the files alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("matplotlib", reason="bench/report.py draws with matplotlib: pip install matplotlib")
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(d: Path, name: str, data: dict) -> None:
    (d / name).write_text(json.dumps(data))


def _results(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    common = {"device": "NVIDIA H100", "versions": {"torch": "2.11"}, "commit": "abc1234", "date": "2026-11-22T10:00:00"}
    _write(d, "model_x.json", {**common, "bench": "model", "command": "python bench/bench_model.py", "rows": [
        {"case": "text x512 items/s", "baseline": "reference", "baseline_value": 30.6, "value": 615.7,
         "unit": "items/s", "ratio": 20.11, "ceiling": None, "fraction_of_ceiling": None,
         "llm_tflops_achieved": 318.1, "ceiling_tflops": 800.0},
        {"case": "peak | memory", "baseline": "reference", "baseline_value": 20.7, "value": 4565.5, "unit": "MiB",
         "ratio": 0.0045, "ceiling": None, "fraction_of_ceiling": None}]})
    _write(d, "kernels_x.json", {**common, "bench": "kernels", "complete": False, "rows": [
        {"case": "topk/q=1", "baseline": "torch.topk", "baseline_value": 2.0, "value": 1.0, "unit": "ms", "ratio": 2.0,
         "ceiling": 3000.0, "fraction_of_ceiling": 0.5},
        {"case": "topk/q=2", "baseline": "torch.topk", "baseline_value": 1.0, "value": 4.0, "unit": "ms", "ratio": 0.25,
         "ceiling": None, "fraction_of_ceiling": None},
        {"case": "oom case", "baseline": "torch.topk", "baseline_value": None, "value": None, "unit": "ms",
         "ratio": None, "error": "OutOfMemoryError: CUDA out of memory"}]})
    return d


def test_renders_tables_and_plots(report, tmp_path):
    d = _results(tmp_path / "results")
    assert report.main(["--results", str(d)]) == 0
    text = (d / "README.md").read_text()
    assert text.count("| case | value |") == 2  # one table per results file
    assert "## kernels" in text and "## model" in text
    assert "| text x512 items/s | 615.7 items/s | reference | 30.60 items/s | 20.11x |  | 39.76% |" in text
    assert "peak \\| memory" in text  # a '|' in a case name does not break the table
    assert "**partial**" in text and "error: OutOfMemoryError" in text
    pngs = sorted(p.name for p in (d / "plots").glob("*.png"))
    assert pngs == ["kernels_x_speedup.png", "model_x_mfu.png", "model_x_throughput_items_per_s.png"]
    for p in pngs:
        assert (d / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{p})" in text
    # --check: up to date now; stale after a results file changes; the README is regenerated, not edited
    assert report.main(["--results", str(d), "--check"]) == 0
    data = json.loads((d / "model_x.json").read_text())
    data["rows"][0]["value"] = 600.0
    (d / "model_x.json").write_text(json.dumps(data))
    assert report.main(["--results", str(d), "--check"]) == 1
    assert report.main(["--results", str(d)]) == 0 and "| 600.0 items/s |" in (d / "README.md").read_text()


def test_every_committed_results_file_renders(report, tmp_path):
    assert report.main(["--results", str(ROOT / "bench" / "results"), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    for path in (ROOT / "bench" / "results").glob("*.json"):
        assert f"### {path.stem}" in text


def test_bad_results_file_is_a_clear_error(report, tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"bench": "x"}))
    with pytest.raises(SystemExit, match="broken.json"):
        report.main(["--results", str(tmp_path)])


def test_cpu_speeds_are_ratios_only_and_errata_are_marked(report, tmp_path):
    d = _results(tmp_path / "results")
    _write(d, "media_cpu.json", {"bench": "media", "device": "CPU (x86_64, 2 cores)", "commit": "abc1234",
                                 "rows": [{"case": "decode", "baseline": "PyAV", "baseline_value": 12.5, "value": 31.25,
                                           "unit": "clips/s", "ratio": 2.5},
                                          {"case": "fuzz runs", "value": 300, "unit": "runs"}]})
    errata = tmp_path / "errata.json"
    errata.write_text(json.dumps({"_about": "comment", "model_x": ["the commit field was set by hand"]}))
    assert report.main(["--results", str(d), "--errata", str(errata)]) == 0
    text = (d / "README.md").read_text()
    assert "| decode | (ratio only) | PyAV |  | 2.50x |" in text and "31.25" not in text and "12.50" not in text
    assert "| fuzz runs | 300.0 runs |" in text  # counts are not speeds
    assert "> Provenance note (hand-written, `bench/errata.json`): the commit field was set by hand" in text
    assert "| 2 | complete, see note |" in text
    pngs = sorted(p.name for p in (d / "plots").glob("*.png"))
    assert "media_cpu_ratio.png" in pngs and not any(p.startswith("media_cpu_throughput") for p in pngs)
    # a note about a file that is not there is refused (it outlived a rename or a rerun)
    errata.write_text(json.dumps({"gone": ["old note"]}))
    assert report.main(["--results", str(d), "--errata", str(errata)]) == 1


def test_committed_errata_name_committed_files(report):
    assert report.main(["--check"]) == 0
