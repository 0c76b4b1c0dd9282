"""Memory: `wave-rt embed` on a 100k-item text manifest with the demo model holds no per-item state beyond
8-byte id hashes, so its peak RSS is that of a 10k-item run (measured in separate child processes).

Each run is a fresh `python` child that runs the CLI in-process and reports its own peak RSS
(getrusage, the kernel's high-water mark) plus an RSS trace sampled every 0.2 s. Both runs use
--shard-rows 4096: the commit buffer is bounded by the shard size, and the demo model's 64-d vectors
would otherwise give 65,536-row shards, more than the whole 10k run (a 7B archive's default is 4,681
rows). The numbers are printed (pytest -s) for the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("psutil")

CHILD = r"""
import json, os, resource, sys, threading, time
import psutil
proc = psutil.Process()
trace = []
stop = threading.Event()
t0 = time.monotonic()

def sample():
    while not stop.is_set():
        trace.append((round(time.monotonic() - t0, 2), proc.memory_info().rss))
        stop.wait(0.2)

threading.Thread(target=sample, daemon=True).start()
from wave_rt.cli import run
code = run(sys.argv[2:])
stop.set()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "peak_rss": peak, "trace": trace, "seconds": time.monotonic() - t0}, f)
"""

MiB = 1 << 20


def _manifest(path: Path, n: int) -> Path:
    # short texts (~10 tokens with the end token) keep the model's time low; long ids (~90 characters) make
    # any per-item state that is kept (ids, rows) show up in the peak
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            item_id = f"collections/archive-{i % 97:02d}/recordings/item-{i:07d}-" + "x" * 40
            f.write(json.dumps({"id": item_id, "text": f"clip {i} of {n}"}) + "\n")
    return path


def _run(tmp: Path, n: int) -> dict:
    src = _manifest(tmp / f"m{n}.jsonl", n)
    out = tmp / f"out{n}"
    report = tmp / f"rss{n}.json"
    cmd = [sys.executable, "-c", CHILD, str(report), "embed", str(src), "--out", str(out), "--shard-rows", "4096",
           "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(report.read_text())
    assert res["code"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == n and manifest["errors"] == 0 and manifest["status"] == "complete"
    return res


def _rss_at(trace: list, fraction: float) -> int:
    """Highest RSS sampled up to `fraction` of the run's duration."""
    end = trace[-1][0] * fraction
    return max(r for t, r in trace if t <= end)


@pytest.mark.slow
def test_archive_memory_100k_text_items_bounded(tmp_path: Path) -> None:
    small = _run(tmp_path, 10_000)
    large = _run(tmp_path, 100_000)
    p_small, p_large = small["peak_rss"], large["peak_rss"]
    tr = large["trace"]
    early, late = _rss_at(tr, 0.3), max(r for t, r in tr if t > tr[-1][0] * 0.3)
    print(f"\npeak RSS: 10k items {p_small / MiB:.0f} MiB ({small['seconds']:.0f} s), "
          f"100k items {p_large / MiB:.0f} MiB ({large['seconds']:.0f} s); "
          f"100k run: max RSS in its first 30% {early / MiB:.0f} MiB, after {late / MiB:.0f} MiB")
    # 10x the items: the 8-byte id hashes add ~1 MiB; everything else is bounded by queue, batch and
    # shard sizes. The slack is for allocator noise, not for growth: 100k of these ids alone are ~14 MiB as
    # Python strings, and 100k rows held until the end (row, id, text, vector) about 55 MiB.
    assert p_large <= p_small + 32 * MiB
    # and inside the long run, memory is flat after the first batches: no creep with the items done
    assert late <= early + 32 * MiB
