"""Time each stage of the archive job (`wave-rt embed`) on a sample, to find the bottleneck before a
million-item run:

    python bench/stagebench.py SOURCE [--sample N] [--model PATH] [--device DEV] [--dtype ...] [--json FILE]

Stages, each timed alone over the same first N items of SOURCE (after one untimed warm-up item):
  read        the source's rows or files -> items (the manifest parsed, as the job reads it)
  decode      open + demux + decode the media (wave_rt.media loaders with the model's settings)
  preprocess  features and tokens: encoder.prepare() minus the decode time of the same item
  model       embed_prepared over token-budget batches (device-synchronized)
  write       the sample's rows and one Parquet shard of them (temp dir, fsync, rename)
then the whole job end to end (the local engine, stages overlapped) on the same sample. A stage's
ceiling is items / (seconds / parallel workers); the lowest ceiling is the bottleneck.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.pipeline import resolve_modality, to_item
from wave_rt.archive.shards import ShardRow, write_shard
from wave_rt.archive.sources import SourceEntry, open_source


@dataclass
class StageTime:
    seconds: float
    items: int
    parallel: int = 1

    @property
    def ceiling(self) -> float:
        """Items per second this stage alone could sustain with its parallelism."""
        return self.items * self.parallel / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class StageReport:
    source: str
    model_id: str
    device: str
    dtype: str
    sample: int
    failed: int
    tokens: list[int] = field(default_factory=list)
    modalities: dict[str, int] = field(default_factory=dict)
    media_seconds: float = 0.0
    stages: dict[str, StageTime] = field(default_factory=dict)
    pipeline_seconds: float = 0.0
    pipeline_items: int = 0
    max_batch_tokens: int = 0
    workers: int = 0
    model_batches: int = 0  # forwards the model stage ran (the job's own count is JobSummary.batches)

    @property
    def pipeline_rate(self) -> float:
        return self.pipeline_items / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0

    @property
    def bottleneck(self) -> str:
        return min(self.stages, key=lambda s: self.stages[s].ceiling) if self.stages else ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = {k: {"seconds": v.seconds, "items": v.items, "parallel": v.parallel, "ceiling_items_per_s":
                           (None if v.ceiling == float("inf") else v.ceiling)} for k, v in self.stages.items()}
        d["pipeline_items_per_s"] = self.pipeline_rate
        d["bottleneck"] = self.bottleneck
        return d

    def table(self) -> str:
        lines = [f"stagebench: {self.sample} items of {self.source} ({self.failed} failed) "
                 f"on {self.device}, {self.model_id} {self.dtype}",
                 "  " + ", ".join(f"{n} {m}" for m, n in sorted(self.modalities.items()))
                 + f"; {sum(self.tokens):,} tokens, {self.media_seconds:.1f} s of media; "
                 f"budget {self.max_batch_tokens} tokens/batch, {self.workers} decode worker(s)",
                 f"  {'stage':<11} {'busy s':>9} {'ms/item':>9} {'parallel':>8} {'ceiling items/s':>16}"]
        for name, st in self.stages.items():
            per = 1000.0 * st.seconds / st.items if st.items else 0.0
            ceil = "inf" if st.ceiling == float("inf") else f"{st.ceiling:,.2f}"
            mark = "  <- bottleneck" if name == self.bottleneck else ""
            lines.append(f"  {name:<11} {st.seconds:9.3f} {per:9.2f} {st.parallel:8d} {ceil:>16}{mark}")
        lines.append(f"  end to end (overlapped): {self.pipeline_items} items in {self.pipeline_seconds:.2f} s = "
                     f"{self.pipeline_rate:,.2f} items/s")
        return "\n".join(lines)


def _sync(encoder: Any) -> None:
    import torch

    if torch.device(getattr(encoder, "device", "cpu")).type == "cuda":
        torch.cuda.synchronize()


def _decode_only(encoder: Any, src: SourceEntry, modality: str) -> None:
    """The media decode that prepare() does first, with the model's own settings."""
    if modality == "text":
        to_item(src, modality)
        return
    from wave_rt import media

    cfg = getattr(encoder, "config", None)
    m = getattr(cfg, "media", None)
    backend = getattr(getattr(encoder, "processor", None), "media_backend", "auto")
    if m is None:
        return  # an encoder without a media config: decode is folded into preprocess
    if modality == "audio":
        media.load_audio(src.path, sample_rate=m.sample_rate, backend=backend)
        return
    kwargs = dict(fps=m.fps, max_frames=m.max_frames, max_pixels=m.max_pixels, min_pixels=m.min_pixels,
                  backend=backend)
    if modality == "video":
        media.load_video(src.path, **kwargs)
    else:
        media.load_av(src.path, **kwargs)


def sample_items(source: Any, n: int, modality: str = "auto") -> list[SourceEntry]:
    src = open_source(source, modality)
    out: list[SourceEntry] = []
    for item in src:
        if item.problem is None:
            out.append(item)
        if len(out) >= n:
            break
    return out


def bench_archive(source: Any, model: Any = None, sample: int = 64, instruction: str | None = None,
                  modality: str = "auto", device: Any = None, dtype: Any = None, max_batch_tokens: int | None = None,
                  workers: int | None = None, encoder: Any = None, items: list[SourceEntry] | None = None,
                  run_pipeline: bool = True) -> StageReport:
    """Measure the stages on the first `sample` items of `source` (or on `items`, already read: then the
    report has no "read" stage)."""
    from wave_rt.archive.job import load_encoder
    from wave_rt.archive.options import JobOptions
    from wave_rt.embed.batching import plan_batches

    if sample <= 0:
        raise ValueError("sample must be positive")
    t0 = time.perf_counter()
    chosen = items if items is not None else sample_items(source, sample, modality)
    t_read = time.perf_counter() - t0
    if not chosen:
        raise ValueError(f"{source}: no items to benchmark")
    opts = JobOptions(instruction=instruction, modality=modality, device=device, dtype=dtype,
                      max_batch_tokens=max_batch_tokens, workers=workers)
    enc = encoder if encoder is not None else load_encoder(model, opts)
    budget = opts.batch_budget(enc)
    n_workers = opts.decode_workers()
    report = StageReport(source=str(source), model_id=str(enc.model_id), device=str(enc.device),
                         dtype=str(enc.dtype).replace("torch.", ""), sample=len(chosen), failed=0,
                         max_batch_tokens=budget, workers=n_workers)

    # Warm-up, untimed: lazy imports, allocator, kernels. A batch, twice: the first multi-row forwards on a
    # CPU cost ~50x a warm one (measured: 0.95 s, 0.38 s, then 0.016 s for 16 texts on the demo model).
    warm = []
    for src in chosen[:8]:
        try:
            mod = resolve_modality(src)
            warm.append(enc.prepare(to_item(src, mod), None if mod == "text" else instruction))
        except Exception:  # noqa: BLE001 - a bad item is counted in the timed pass below
            continue
        if len(warm) == 4:
            break
    for _ in range(2 if warm else 0):
        enc.embed_prepared(warm)
    _sync(enc)

    t_decode = t_prep = 0.0
    prepared = []
    kept: list[tuple[SourceEntry, str]] = []
    instructions: list[str | None] = []  # what each item is embedded with, as the job records it
    for src in chosen:
        try:
            t0 = time.perf_counter()
            mod = resolve_modality(src)  # the stream probe counts as decode, as in the job
            tp = time.perf_counter()
            _decode_only(enc, src, mod)
            t1 = time.perf_counter()
            instr = None if mod == "text" else (src.instruction if src.instruction is not None else instruction)
            p = enc.prepare(to_item(src, mod), instr)
            t2 = time.perf_counter()
        except Exception:  # noqa: BLE001 - a bad item is counted, not fatal, as in the job
            report.failed += 1
            continue
        t_decode += t1 - t0
        # prepare() decodes again (without the probe), then computes features and tokens
        t_prep += max(0.0, (t2 - t1) - (t1 - tp)) if mod != "text" else (t2 - t1)
        prepared.append(p)
        kept.append((src, mod))
        instructions.append(instr)
        report.modalities[mod] = report.modalities.get(mod, 0) + 1
        report.tokens.append(int(p.num_tokens))
        report.media_seconds += float(p.duration or 0.0)
    n = len(prepared)
    if n == 0:
        raise ValueError(f"{source}: every sampled item failed to decode")
    if items is None:
        report.stages["read"] = StageTime(t_read, n, 1)
    report.stages["decode"] = StageTime(t_decode, n, n_workers)
    report.stages["preprocess"] = StageTime(t_prep, n, n_workers)

    _sync(enc)
    t0 = time.perf_counter()
    vectors = np.zeros((n, int(enc.dim)), np.float32)
    for group in plan_batches([p.num_tokens for p in prepared], budget, None, packed=bool(getattr(enc, "packed", False))):
        report.model_batches += 1
        out = enc.embed_prepared([prepared[i] for i in group])
        vectors[group] = out.detach().float().cpu().numpy()
    _sync(enc)
    report.stages["model"] = StageTime(time.perf_counter() - t0, n, 1)

    with tempfile.TemporaryDirectory(prefix="wave-rt-bench-") as tmp:
        s0, m0 = kept[0]
        write_shard(tmp, 99999, [ShardRow(s0.id, s0.path, m0, None, s0.text, instruction)], vectors[:1], int(enc.dim),
                    "float32")  # warm-up: Parquet/zstd init
        t0 = time.perf_counter()
        # the rows are built here, as the job builds them per batch
        rows = [ShardRow(s.id, s.path, m, None if p.duration is None else float(p.duration), s.text, instr)
                for (s, m), p, instr in zip(kept, prepared, instructions)]
        write_shard(tmp, 0, rows, vectors, int(enc.dim), "float32")
        report.stages["write"] = StageTime(time.perf_counter() - t0, n, 1)

        if run_pipeline:
            from wave_rt.archive.job import embed_archive

            manifest = Path(tmp) / "sample.jsonl"
            with open(manifest, "w", encoding="utf-8") as f:
                for s, m in kept:
                    row = {"id": s.id, "modality": m}
                    if s.path is not None:
                        row["path"] = s.path
                    if s.text is not None:
                        row["text"] = s.text
                    if s.instruction is not None:
                        row["instruction"] = s.instruction
                    f.write(json.dumps(row) + "\n")
            t0 = time.perf_counter()
            summary = embed_archive(str(manifest), os.path.join(tmp, "out"), model=enc, instruction=instruction,
                                    max_batch_tokens=budget, workers=n_workers, progress=False)
            report.pipeline_seconds = time.perf_counter() - t0
            report.pipeline_items = summary.embedded
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from wave_rt.errors import WaveRTError

    ap = argparse.ArgumentParser(prog="bench/stagebench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", metavar="SOURCE", help="what `wave-rt embed` would read")
    ap.add_argument("--sample", type=int, default=64, metavar="N", help="items to time (the first N of SOURCE)")
    ap.add_argument("--model", default=None, metavar="PATH", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda ... (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="model compute dtype")
    ap.add_argument("--max-batch-tokens", type=int, default=None, metavar="N", help="token budget per batch")
    ap.add_argument("--workers", type=int, default=None, metavar="N", help="decode threads")
    ap.add_argument("--instruction", default=None, metavar="TEXT", help="instruction for media items")
    ap.add_argument("--modality", default="auto", choices=["auto", "text", "audio", "video", "av"],
                    help="how to read items without a modality column")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the measurements as JSON")
    args = ap.parse_args(argv)
    try:
        report = bench_archive(args.source, model=args.model, sample=args.sample, instruction=args.instruction,
                               modality=args.modality, device=args.device, dtype=args.dtype,
                               max_batch_tokens=args.max_batch_tokens, workers=args.workers)
    except (WaveRTError, ValueError, OSError) as exc:
        print(f"stagebench: error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
