"""Render every bench/results/*.json into bench/results/README.md (one Markdown table per results file,
grouped by benchmark) and PNG plots in bench/results/plots/: throughput per workload against its
baseline, MFU per workload where a benchmark reports it, and kernel speed-ups against their baselines.

    python bench/report.py [--results DIR] [--out DIR] [--check]

It reads the JSON files only (DESIGN.md section 7 shape) and writes nothing else; the numbers are the
files' own. Files measured on a CPU show their speeds as ratios only (the shared CPU's absolute speeds are
not claims; the JSON keeps them). bench/errata.json holds hand-written provenance notes, shown beside the file
they are about and marked as such. --check exits 1 when README.md is not what the JSON files render to.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THROUGHPUT_UNITS = ("items/s", "audio-s/s", "video-s/s", "frames/s", "tokens/s", "rows/s", "clips/s")
SPEED_UNITS = THROUGHPUT_UNITS + ("ms", "s", "us")  # shown as ratios only when a CPU measured them
PLOTS = "plots"
ERRATA = HERE / "errata.json"


# ---------------------------------------------------------------------------------------------- reading
def load_results(results: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file stem, parsed JSON) of every results file, sorted by benchmark then name."""
    runs = []
    for path in sorted(results.glob("*.json")):
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and "rows" not in data and isinstance(data.get("groups"), dict):
            data = eval_as_results(data)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise SystemExit(f"bench/report.py: {path} is not a results file (no 'rows' list)")
        runs.append((path.stem, data))
    return sorted(runs, key=lambda r: (str(r[1].get("bench", "")), r[0]))


def eval_as_results(report: dict[str, Any]) -> dict[str, Any]:
    """A `wave-rt eval` report ({model, manifest, groups: {group: {metric: value}}}) viewed as result rows:
    Recall@k against chance (k / number of targets in the group), mAP and QA accuracy as they are."""
    rows = []
    for group, metrics in report["groups"].items():
        targets = metrics.get("targets")
        for name, value in metrics.items():
            if name in ("n", "targets") or not isinstance(value, (int, float)):
                continue
            row: dict[str, Any] = {"case": f"{group}: {name}", "value": value, "unit": ""}
            if "R@" in name and targets:
                k = int(name.split("R@")[1])
                chance = min(1.0, k / targets)
                row.update(baseline="chance", baseline_value=chance, ratio=value / chance)
            rows.append(row)
    return {"bench": "eval", "device": "", "command": f"wave-rt eval {report.get('manifest', '')} --model "
            f"{report.get('model', '')}", "rows": rows}


def load_errata(path: Path = ERRATA) -> dict[str, list[str]]:
    """File stem -> hand-written provenance notes (bench/errata.json); keys starting with '_' are comments."""
    if not path.exists():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return {k: list(v) for k, v in data.items() if not k.startswith("_")}


def on_cpu(data: dict[str, Any]) -> bool:
    return str(data.get("device", "")).startswith("CPU")


def is_partial(data: dict[str, Any]) -> bool:
    return data.get("complete") is False or bool(data.get("partial"))


def mfu(row: dict[str, Any]) -> dict[str, float]:
    """The MFU figures a row reports: keys with 'mfu' in their name, or achieved / ceiling TFLOP/s."""
    out = {k: float(v) for k, v in row.items() if "mfu" in k and isinstance(v, (int, float))}
    achieved, ceiling = row.get("llm_tflops_achieved"), row.get("ceiling_tflops")
    if not out and isinstance(achieved, (int, float)) and isinstance(ceiling, (int, float)) and ceiling > 0:
        out["llm_mfu"] = float(achieved) / float(ceiling)
    return out


# ---------------------------------------------------------------------------------------------- Markdown
def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == 0 or not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: Iterable[dict[str, Any]], absolute: bool = True) -> list[str]:
    """One Markdown table; absolute=False (a CPU run) leaves the cells of speed units to the ratio column."""
    lines = ["| case | value | baseline | baseline value | ratio | of ceiling | MFU |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        unit = r.get("unit", "")
        shown = absolute or unit not in SPEED_UNITS
        if "error" in r and r.get("value") is None:
            value = f"error: {_cell(r['error'])[:120]}"
        else:
            value = f"{_num(r.get('value'))} {unit}".strip() if shown else "(ratio only)"
        base = r.get("baseline_value") if shown else None
        frac = r.get("fraction_of_ceiling")
        m = mfu(r)
        mfu_text = ", ".join(f"{_num(100 * v)}%" + ("" if len(m) == 1 else f" ({k})") for k, v in sorted(m.items()))
        lines.append("| " + " | ".join([
            _cell(r.get("case", "")), value, _cell(r.get("baseline", "")),
            f"{_num(base)} {unit}".strip() if base is not None else "",
            f"{_num(r.get('ratio'))}x" if r.get("ratio") is not None else "",
            f"{_num(100 * frac)}%" if isinstance(frac, (int, float)) else "",
            mfu_text,
        ]) + " |")
    return lines


def render(runs: list[tuple[str, dict[str, Any]]], plots: dict[str, list[str]],
           errata: dict[str, list[str]] | None = None) -> str:
    errata = errata or {}
    out = ["# Benchmark results", "",
           "Generated by `python bench/report.py` from the JSON files in this folder; do not edit by hand. "
           "Each file names its device, versions, commit and command; ratios compare against a baseline "
           "measured in the same run. Files measured on a CPU show speeds as ratios only (their JSON keeps the "
           "measured values; a shared CPU's absolute speeds are not claims). Hand-written provenance notes "
           "(`bench/errata.json`) are marked as such.", ""]
    out += ["| file | benchmark | device | date | commit | rows | status |", "|---|---|---|---|---|---:|---|"]
    for stem, d in runs:
        status = "partial" if is_partial(d) else "complete"
        if stem in errata:
            status += ", see note"
        out.append(f"| [{stem}.json](#{stem.replace('_', '-').lower()}) | {_cell(d.get('bench', ''))} | "
                   f"{_cell(d.get('device', ''))} | {_cell(str(d.get('date', ''))[:10])} | "
                   f"{_cell(d.get('commit', ''))} | {len(d['rows'])} | {status} |")
    current = None
    for stem, d in runs:
        bench = str(d.get("bench", "other"))
        if bench != current:
            out += ["", f"## {bench}"]
            current = bench
        out += ["", f"### {stem}", ""]
        out.append(f"{_cell(d.get('device', '?'))}, {str(d.get('date', ''))[:19]}, commit `{d.get('commit', '?')}`"
                   + (" — **partial** (the run stopped before the end)" if is_partial(d) else ""))
        versions = d.get("versions") or {}
        if versions:
            out.append("; ".join(f"{k} {v}" for k, v in sorted(versions.items())))
        if d.get("command"):
            out += ["", f"`{_cell(d['command'])}`"]
        for note in errata.get(stem, []):
            out += ["", f"> Provenance note (hand-written, `bench/errata.json`): {_cell(note)}"]
        out += [""] + table(d["rows"], absolute=not on_cpu(d))
        for key in ("not_measured",):
            if d.get(key):
                out += ["", f"Not measured: {_cell(json.dumps(d[key]))}"]
        for png in plots.get(stem, []):
            out += ["", f"![{png}]({PLOTS}/{png})"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- plots
def _short(case: str, n: int = 60) -> str:
    return case if len(case) <= n else case[: n - 1] + "…"


def _barh(path: Path, labels: list[str], series: list[tuple[str, list[float]]], xlabel: str, title: str,
          log: bool = False, ref: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(labels)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * n * max(1, len(series))))
    height = 0.8 / len(series)
    y = np.arange(n)
    for k, (name, values) in enumerate(series):
        ax.barh(y + (k - (len(series) - 1) / 2) * height, values, height, label=name)
    ax.set_yticks(y, [_short(s) for s in labels], fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    if ref is not None:
        ax.axvline(ref, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def _ratio_plot(plot_dir: Path, name: str, rows: list[dict[str, Any]], series: str, xlabel: str, title: str) -> str:
    """Each row's ratio to its baseline on a log axis with 1 marked; returns the PNG's name."""
    _barh(plot_dir / name, [f"{r['case']} vs {r.get('baseline', '')}" for r in rows],
          [(series, [float(r["ratio"]) for r in rows])], xlabel, title, log=True, ref=1.0)
    return name


def make_plots(runs: list[tuple[str, dict[str, Any]]], out_dir: Path) -> dict[str, list[str]]:
    """Writes the PNGs; returns file stem -> PNG names."""
    made: dict[str, list[str]] = {}
    plot_dir = out_dir / PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("*.png"):
        stale.unlink()
    for stem, d in runs:
        rows = [r for r in d["rows"] if isinstance(r.get("value"), (int, float))]
        title = f"{stem} ({d.get('device', '?')})"
        names: list[str] = []
        tput = [r for r in rows if r.get("unit") in THROUGHPUT_UNITS]
        if on_cpu(d):
            # a CPU run's speeds are plotted as ratios to their baselines, as its table shows them
            sel = [r for r in rows if r.get("unit") in SPEED_UNITS and isinstance(r.get("ratio"), (int, float))
                   and r["ratio"] > 0]
            if sel:
                names.append(_ratio_plot(plot_dir, f"{stem}_ratio.png", sel, "ratio",
                                         "ratio to the baseline (x, log; 1 = equal)", f"ratios: {title}"))
            tput = []
        if tput:
            for unit in sorted({r["unit"] for r in tput}):
                sel = [r for r in tput if r["unit"] == unit]
                series = [("measured", [float(r["value"]) for r in sel])]
                if all(isinstance(r.get("baseline_value"), (int, float)) for r in sel):
                    series.append(("baseline", [float(r["baseline_value"]) for r in sel]))
                name = f"{stem}_throughput_{unit.replace('/', '_per_')}.png"
                _barh(plot_dir / name, [r["case"] for r in sel], series, unit, f"throughput: {title}", log=True)
                names.append(name)
        with_mfu = [(r["case"], mfu(r)) for r in rows if mfu(r)]
        if with_mfu:
            keys = sorted({k for _, m in with_mfu for k in m})
            series = [(k, [100 * m.get(k, 0.0) for _, m in with_mfu]) for k in keys]
            name = f"{stem}_mfu.png"
            _barh(plot_dir / name, [c for c, _ in with_mfu], series, "MFU (% of bf16 peak)", f"MFU: {title}")
            names.append(name)
        if d.get("bench") == "kernels" and not on_cpu(d):
            sel = [r for r in rows if isinstance(r.get("ratio"), (int, float)) and r["ratio"] > 0]
            if sel:
                names.append(_ratio_plot(plot_dir, f"{stem}_speedup.png", sel, "speed-up",
                                         "speed-up vs baseline (x, log; 1 = equal)", f"kernel speed-ups: {title}"))
        if names:
            made[stem] = names
    return made


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of results JSON files")
    ap.add_argument("--out", type=Path, default=None, help="where README.md and plots/ go (default: --results)")
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is stale; write nothing")
    ap.add_argument("--errata", type=Path, default=ERRATA, help="hand-written provenance notes (JSON: stem -> notes)")
    args = ap.parse_args(argv)
    out = args.out or args.results
    runs = load_results(args.results)
    errata = load_errata(args.errata)
    # a note about a file that is gone (renamed, rerun) must go too: checked for the committed results, and
    # for any errata file named explicitly
    checked = args.results.resolve() == RESULTS.resolve() or args.errata != ERRATA
    unknown = sorted(set(errata) - {stem for stem, _ in runs}) if checked else []
    if unknown:
        print(f"bench/report.py: {args.errata} has notes on files that are not there: {unknown}", file=sys.stderr)
        return 1
    if not runs:
        print(f"bench/report.py: no *.json in {args.results}", file=sys.stderr)
        return 1
    if args.check:
        plots = {stem: names for stem, names in _planned_plots(runs).items()}
        want = render(runs, plots, errata)
        have = (out / "README.md").read_text(encoding="utf-8") if (out / "README.md").exists() else ""
        if want != have:
            print(f"bench/report.py: {out / 'README.md'} is stale; run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out)
    (out / "README.md").write_text(render(runs, plots, errata), encoding="utf-8")
    n_png = sum(len(v) for v in plots.values())
    print(f"wrote {out / 'README.md'} ({len(runs)} results files) and {n_png} plots in {out / PLOTS}")
    return 0


def _planned_plots(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, list[str]]:
    """The plot names make_plots would write, without drawing (for --check)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return make_plots(runs, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
