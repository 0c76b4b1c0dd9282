"""Progress of an archive job: a live one-line bar on a terminal, plain log lines every few seconds
otherwise (CI logs, nohup), and the final summary table. All counters are O(1) memory."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

STAGES = ("prepare", "model", "write")  # prepare = probe + decode + features + tokens (bench/stagebench.py splits it)


@dataclass
class JobSummary:
    """What embed_archive returns (also printed as the final table)."""

    source: str
    out_dir: str
    engine: str
    model_id: str = ""
    config_hash: str = ""
    dtype: str = ""
    dim: int = 0
    seen: int = 0  # items the source listed this run
    already_done: int = 0  # skipped: finished by an earlier run
    embedded: int = 0  # rows written this run
    failed: int = 0  # error records written this run
    rows_total: int = 0  # rows in the archive after this run
    errors_total: int = 0
    shards_total: int = 0
    tokens: int = 0
    audio_seconds: float = 0.0
    video_seconds: float = 0.0
    setup_seconds: float = 0.0  # source scan, resume recovery, model load
    wall_seconds: float = 0.0  # embedding itself (what the rates divide by)
    # when the forwards ran, in seconds from the start of wall_seconds (None: no forward, or the Ray engine):
    # wall = lead-in before the first forward + the forwards' span + the tail after the last one, and the span
    # less model_active_seconds is the time the model waited between forwards
    first_forward_at: float | None = None
    last_forward_end_at: float | None = None
    model_active_seconds: float | None = None  # time during which at least one forward ran (same engines)
    stage_seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    workers: int = 0
    batches: int = 0
    oom_splits: int = 0
    nothing_to_do: bool = False
    interrupted: bool = False
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rate(self, value: float) -> float:
        return value / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def table(self) -> str:
        rows: list[tuple[str, str]] = [("source", self.source), ("output", self.out_dir)]
        if self.model_id:
            rows.append(("model", f"{self.model_id} (config {self.config_hash}, {self.dtype}, dim {self.dim})"))
        rows.append(("engine", self.engine))
        if self.nothing_to_do:
            rows.append(("status", f"nothing to do: all {self.already_done:,} items of the source are already "
                                   f"in the archive"))
        else:
            state = "interrupted (re-run the same command to resume)" if self.interrupted else (
                "complete" if self.complete else "stopped")
            rows.append(("status", state))
            rows.append(("embedded", f"{self.embedded:,} items this run ({self.already_done:,} already done)"))
            rows.append(("failed", f"{self.failed:,} this run" + (" (see errors.jsonl)" if self.failed else "")))
        rows.append(("archive", f"{self.rows_total:,} rows in {self.shards_total} shard(s), "
                                f"{self.errors_total:,} error record(s)"))
        if not self.nothing_to_do:
            rows.append(("wall time", f"{_duration(self.wall_seconds)} (+ {_duration(self.setup_seconds)} setup: "
                                      "scan, resume, model load)"))
            rows.append(("throughput", f"{self.rate(self.embedded + self.failed):,.2f} items/s, "
                                       f"{self.rate(self.tokens):,.0f} tokens/s, "
                                       f"audio {self.rate(self.audio_seconds):,.2f} s/s, "
                                       f"video {self.rate(self.video_seconds):,.2f} s/s"))
            if self.first_forward_at is not None and self.last_forward_end_at is not None \
                    and self.model_active_seconds is not None:
                span = self.last_forward_end_at - self.first_forward_at
                share = f" ({self.model_active_seconds / span:.0%})" if span > 0 else ""
                rows.append(("model timeline", f"first forward after {_duration(self.first_forward_at)}; forwards "
                                               f"running {_duration(self.model_active_seconds)} of the "
                                               f"{_duration(span)} from the first to the last{share}; "
                                               f"{_duration(self.wall_seconds - self.last_forward_end_at)} after"))
            busy = ", ".join(f"{s} {self.stage_seconds.get(s, 0.0):.2f} s" for s in STAGES)
            rows.append(("stage busy time", f"{busy} ({self.workers} {'Ray' if self.engine == 'ray' else 'decode'} worker(s), {self.batches} batches"
                                            + (f", {self.oom_splits} OOM splits" if self.oom_splits else "") + ")"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(["wave-rt embed summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Thread-safe counters plus rendering. `total` may be None (unknown) or set later."""

    def __init__(self, total: int | None = None, stream: TextIO | None = None, tty: bool | None = None,
                 log_every: float = 30.0, refresh: float = 0.25, enabled: bool = True, label: str = "embed") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total = total
        self.log_every = log_every
        self.refresh = refresh
        self.enabled = enabled
        self.label = label
        self.done = 0
        self.failed = 0
        self.tokens = 0
        self.audio_seconds = 0.0
        self.video_seconds = 0.0
        self.stage_seconds = {s: 0.0 for s in STAGES}
        self._lock = threading.Lock()
        self.start = time.monotonic()
        self.first_forward_at: float | None = None  # seconds since start (see JobSummary)
        self.last_forward_end_at: float | None = None
        self.model_active_seconds = 0.0
        self._forwards_running = 0
        self._active_since = 0.0
        self._last_render = self.start if not self.tty else 0.0
        self._drawn = False

    # -------------------------------------------------------------- counters
    def add(self, done: int = 0, failed: int = 0, tokens: int = 0, audio_seconds: float = 0.0,
            video_seconds: float = 0.0) -> None:
        with self._lock:
            self.done += done
            self.failed += failed
            self.tokens += tokens
            self.audio_seconds += audio_seconds
            self.video_seconds += video_seconds

    def add_stage(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def forward_started(self) -> float:
        """A forward begins (on any model thread); returns its start time for forward_ended."""
        now = time.monotonic()
        with self._lock:
            if self._forwards_running == 0:
                self._active_since = now
            self._forwards_running += 1
            if self.first_forward_at is None:
                self.first_forward_at = now - self.start
        return now

    def forward_ended(self, started: float) -> None:
        """The forward begun at `started` is done: its busy time (summed over threads, as every stage's) and the
        time during which at least one forward ran (model_active_seconds: two model threads overlap)."""
        now = time.monotonic()
        with self._lock:
            self.stage_seconds["model"] = self.stage_seconds.get("model", 0.0) + (now - started)
            self._forwards_running -= 1
            if self._forwards_running == 0:
                self.model_active_seconds += now - self._active_since
            self.last_forward_end_at = now - self.start

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # -------------------------------------------------------------- rendering
    def line(self) -> str:
        el = max(self.elapsed, 1e-9)
        n = self.done + self.failed
        rate = n / el
        parts = []
        if self.total:
            parts.append(f"{n:,}/{self.total:,} ({100.0 * n / self.total:.1f}%)")
        else:
            parts.append(f"{n:,} items")
        parts.append(f"{rate:,.1f} items/s")
        parts.append(f"{self.tokens / el:,.0f} tok/s")
        if self.audio_seconds:
            parts.append(f"audio {self.audio_seconds / el:,.1f} s/s")
        if self.video_seconds:
            parts.append(f"video {self.video_seconds / el:,.1f} s/s")
        parts.append(f"failed {self.failed:,}")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration(max(0, self.total - n) / rate)}")
        elif self.total:
            parts.append("ETA ?")
        return " | ".join(parts)

    def _bar(self, text: str) -> str:
        cols = shutil.get_terminal_size((100, 20)).columns
        room = cols - len(text) - len(self.label) - 5
        if self.total and room >= 10:
            width = min(30, room)
            filled = int(width * min(1.0, (self.done + self.failed) / self.total))
            return f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {text}"[: cols - 1]
        return f"{self.label} {text}"[: cols - 1]

    def maybe_render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        every = self.refresh if self.tty else self.log_every
        if not force and now - self._last_render < every:
            return
        self._last_render = now
        with self._lock:
            text = self.line()
        if self.tty:
            self.stream.write("\r" + self._bar(text) + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(f"{self.label}: {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.maybe_render(force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
