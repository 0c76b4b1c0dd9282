"""Crash test: `wave-rt embed` killed with SIGKILL at random points (several seeds), then resumed, ends with
exactly the ids and vectors of an uninterrupted run; a reader polling the directory meanwhile never sees a
partial shard."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from archive_helpers import make_media_archive, read_archive


def _source(tmp: Path) -> Path:
    media = make_media_archive(tmp / "media")
    rows = [{"id": f"t{i:03d}", "text": f"item {i}: " + " ".join(["word"] * (i % 17 + 1))} for i in range(90)]
    for rel in ("speech/hello.wav", "tones/tone.flac", "video/clip.mp4", "video/silent.webm", "bad/broken.mp4",
                "bad/empty.flac", "tones/noise.ogg"):
        rows.insert(len(rows) // 2, {"id": rel, "path": str(media / rel)})
    rows.append({"id": "t000", "text": "duplicate id"})
    manifest = tmp / "items.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "wave_rt.cli", "embed", str(src), "--out", str(out), "--shard-rows", "4",
            "--commit-every", "0", "--workers", "1", "--max-batch-tokens", "160", "--no-progress"]


class ShardReader(threading.Thread):
    """Reads every part-*.parquet in full as soon as it appears (a shard is immutable once visible, so
    the first read is the one that could catch a partial file), while runs are killed and resumed."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out = out
        self.stop = threading.Event()
        self.reads = 0
        self.failures: list[str] = []
        self.seen: set[str] = set()

    def run(self) -> None:
        import pyarrow.parquet as pq

        while not self.stop.is_set():
            if self.out.exists():
                for p in sorted(self.out.glob("part-*.parquet")):
                    if p.name in self.seen:
                        continue
                    self.seen.add(p.name)
                    try:
                        pq.read_table(p)
                        self.reads += 1
                    except FileNotFoundError:
                        pass  # not possible here (shards are never deleted), but never a failure of atomicity
                    except Exception as exc:  # noqa: BLE001
                        self.failures.append(f"{p.name}: {exc}")
            time.sleep(0.002)


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines() if line.strip()]


def _kill_at(cmd: list[str], out: Path, rng: random.Random, t_ref: float, env: dict[str, str]) -> str:
    """Start a run and SIGKILL it at a random point: a random time, or just after a random number of
    shards has been committed (plus a random delay), so that kills land in every phase."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    start_shards = len(list(out.glob("part-*.parquet"))) if out.exists() else 0
    if rng.random() < 0.4:
        target = ("time", rng.uniform(0.2, t_ref))
    else:
        target = ("shards", start_shards + rng.randint(1, 6))
    t0 = time.monotonic()
    while proc.poll() is None:
        if target[0] == "time" and time.monotonic() - t0 >= target[1]:
            break
        if target[0] == "shards" and out.exists() and len(list(out.glob("part-*.parquet"))) >= target[1]:
            time.sleep(rng.uniform(0.0, 0.15))
            break
        time.sleep(0.005)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"{target[0]}={target[1]:.2f}" + (" (finished first)" if finished else "")


def test_archive_crash_sigkill_resume(tmp_path: Path) -> None:
    src = _source(tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref_out = tmp_path / "reference"
    t0 = time.monotonic()
    subprocess.run(_cmd(src, ref_out), check=True, env=env, capture_output=True)
    t_ref = time.monotonic() - t0
    print(f"uninterrupted run: {t_ref:.1f} s")
    ref = read_archive(ref_out)
    ref_errors = sorted(e["id"] for e in _errors(ref_out))
    assert len(ref) == 95 and ref_errors == ["bad/broken.mp4", "bad/empty.flac", "t000"]

    interrupted: list[bool] = []
    for seed in (0, 1, 2):
        rng = random.Random(seed)
        out = tmp_path / f"run{seed}"
        reader = ShardReader(out)
        reader.start()
        kills = [_kill_at(_cmd(src, out), out, rng, t_ref, env) for _ in range(2 if seed == 0 else 1)]
        rows_before_resume = sum(1 for _ in out.glob("part-*.parquet")) * 4 if out.exists() else 0
        interrupted.append(any("finished first" not in k for k in kills) and rows_before_resume < len(ref))
        leftovers = [p.name for p in out.glob(".tmp-part-*")] if out.exists() else []
        done = subprocess.run(_cmd(src, out), env=env, capture_output=True, text=True)
        reader.stop.set()
        reader.join()
        assert done.returncode == 0, done.stderr
        assert not reader.failures, f"seed {seed}: a reader saw a partial shard: {reader.failures[:3]}"
        got = read_archive(out)  # also asserts that no id was written twice
        assert set(got) == set(ref), f"seed {seed} kills {kills}"
        worst = max(float(np.abs(got[i]["embedding"] - ref[i]["embedding"]).max()) for i in ref)
        assert worst <= 1e-5, f"seed {seed}: embeddings differ by {worst}"
        errs = [e["id"] for e in _errors(out)]
        assert sorted(errs) == ref_errors, f"seed {seed} kills {kills}: errors {errs}"  # each exactly once
        assert not list(out.glob(".tmp-part-*")), "resume must remove partial shards"
        journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
        assert sorted(j["shard"] for j in journal) == sorted(p.name for p in out.glob("part-*.parquet"))
        assert sum(j["rows"] for j in journal) == len(ref)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["rows"] == len(ref)
        print(f"seed {seed}: kills {kills}, temp files left by the kills {leftovers}, reader reads {reader.reads}")
    # the kills must really have cut runs short, or this test proves nothing
    assert any(interrupted), "every killed run had already finished: no resume was exercised"
