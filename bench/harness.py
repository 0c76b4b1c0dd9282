"""One benchmark harness: timing with warm-up excluded and device sync before reading clocks, peak
memory, the device description and versions, and the JSON result file (DESIGN.md section 7)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# WAVE_RT_RESULTS: another folder for the JSON (the smoke tests run the scripts without touching committed files)
RESULTS = Path(os.environ.get("WAVE_RT_RESULTS") or Path(__file__).resolve().parent / "results")

# Measured ceilings of the machines our GPU benchmarks run on (DESIGN.md section 4).
CEILINGS = {
    "H100": {"bandwidth_GBps": 3000.0, "bf16_TFLOPs": 800.0},
    "H200": {"bandwidth_GBps": 4300.0, "bf16_TFLOPs": 790.0},
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def ceiling(kind: str) -> float | None:
    name = device_name()
    for key, values in CEILINGS.items():
        if key in name:
            return values[kind]
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "triton", "numpy", "nvidia.dali", "onnxruntime"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            continue
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or "?"
    return out


def git_commit() -> str:
    if os.environ.get("WAVE_RT_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["WAVE_RT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
        # a measurement of uncommitted code must not carry a clean commit's name
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top,exclude)bench/results"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Median/min/max seconds of `repeats` timed calls after `warmup` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def _malloc_in_use() -> int | None:
    """Bytes currently allocated through glibc malloc (heap + mmapped chunks), or None off glibc.

    Process RSS is useless for a CPU peak: freed pages stay mapped and reused. mallinfo2 counts the
    bytes in use right now, and large tensors (mmapped chunks) drop out of it as soon as they are freed."""
    import ctypes

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak on GPU; on CPU, bytes in use by
    malloc sampled from a background thread (torch releases the GIL inside ops, so the sampler runs)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = _malloc_in_use() or 0
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _malloc_in_use() or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _malloc_in_use() or 0)
            self.peak_bytes = self._peak - self._base


def row(case: str, baseline: str, baseline_value: float | None, value: float | None, unit: str,
        ceiling_value: float | None = None, higher_is_better: bool = True, **extra: Any) -> dict[str, Any]:
    """ratio > 1 always means 'ours is better' (faster, or less memory); a side that failed (out of memory) is
    None, with its reason in the extra fields, and the ratio is None."""
    if baseline_value and value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    else:
        ratio = None
    frac = (value / ceiling_value) if (ceiling_value and value) else None
    out = {"case": case, "baseline": baseline, "baseline_value": baseline_value, "value": value, "unit": unit,
           "ratio": ratio, "ceiling": ceiling_value, "fraction_of_ceiling": frac}
    out.update(extra)
    return out


def write_result(bench: str, rows: list[dict[str, Any]], command: str, suffix: str | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = "cuda-" + device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"{bench}_{suffix or dev}.json"
    doc = {"bench": bench, "device": device_name(), "versions": versions(), "commit": git_commit(),
           "command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "rows": rows}
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def dry_run_report(script: str, outputs: list[Path], inputs: list[Path] = ()) -> int:
    """What `--dry-run` of a GPU benchmark checks without a GPU: its inputs exist and its output folders are
    writable. Prints one line per check; returns the exit status (0 = the real run can start)."""
    bad = 0
    for p in inputs:
        ok = Path(p).exists()
        bad += not ok
        print(f"dry-run {script}: input {p}: {'ok' if ok else 'MISSING'}")
    for p in outputs:
        d = Path(p).parent
        d.mkdir(parents=True, exist_ok=True)
        ok = os.access(d, os.W_OK)
        bad += not ok
        print(f"dry-run {script}: output {p}: {'writable' if ok else 'NOT WRITABLE'}")
    return 1 if bad else 0
