"""`wave-rt bench-latency`: per backend and modality, latency percentiles at batch 1 and throughput at
larger batches, warm-up excluded, as JSON (DESIGN.md section 7 rows plus the raw percentiles) and a PNG.

Every backend runs the same host-side bookkeeping (StageInputs) and differs only in the stage runner:
- ``eager``: the stage modules in PyTorch (the baseline of every ratio),
- ``compile``: the same modules under torch.compile(dynamic=True),
- ``aoti``: the bundle's AOTInductor packages,
- ``onnxruntime``: the bundle's ONNX graphs on ONNX Runtime (CUDA EP with IO binding on a GPU),
- ``tensorrt``: the bundle's engines (where TensorRT is installed and engines were built).
Items are collated once per batch outside the timed region; what is timed is one model call on a
collated batch (host bookkeeping + stages), with a device sync before the clock is read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wave_rt.embed.prepared import PreparedItem
from wave_rt.model.batch import PaddedBatch, collate
from wave_rt.model.wave_model import WaveModel

ALL_BACKENDS = ("eager", "compile", "aoti", "onnxruntime", "tensorrt")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_load() -> dict[str, Any]:
    """What else the machine was doing: load average and cores (a shared CI box skews CPU timings)."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"loadavg_1_5_15": load, "cpu_count": os.cpu_count()}


def backend_model(backend: str, model: WaveModel, bundle: Path | None, device: torch.device,
                  threads: int | None = None) -> Callable[[PaddedBatch], torch.Tensor]:
    from wave_rt.export.runtime import BundleModel, TorchStage, load_bundle_model
    from wave_rt.export.stages import stage_specs

    if backend in ("eager", "compile"):
        stages = {}
        for spec in stage_specs(model):
            module = spec.module
            if backend == "compile":
                module = torch.compile(module, dynamic=True)
            stages[spec.name] = TorchStage(module, spec.inputs)
        return BundleModel(model.config, model.model.embed_tokens.weight.detach(), stages, device)
    if bundle is None:
        raise ValueError(f"backend {backend!r} needs a bundle")
    engine, _ = load_bundle_model(bundle, backend, device=device, threads=threads, check_hashes=False)
    return engine


def _batches(items: Sequence[PreparedItem], size: int, pad_id: int) -> list[PaddedBatch]:
    out = []
    for start in range(0, len(items) - size + 1, size):
        out.append(collate([p.inputs for p in items[start:start + size]], pad_id))
    return out


def measure(run: Callable[[PaddedBatch], torch.Tensor], batches: list[PaddedBatch], device: torch.device,
            warmup: int, iters: int, dtype: torch.dtype) -> list[float]:
    """Seconds per call over `iters` calls cycling through batches, after `warmup` untimed calls and at least
    one untimed call of every batch: a shape first seen in the timed loop pays cuBLAS heuristics, allocator
    growth or a recompile (eager text on the H200: p50 29 ms, p99 877 ms with 3 warm-up calls over 8 shapes)."""
    moved = [b.to(device, dtype) for b in batches]
    with torch.inference_mode():
        for k in range(max(warmup, len(moved))):
            run(moved[k % len(moved)])
        _sync(device)
        times = []
        for k in range(iters):
            t0 = time.perf_counter()
            run(moved[k % len(moved)])
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def bench_latency(
    model: WaveModel,
    items: dict[str, list[PreparedItem]],
    backends: Sequence[str],
    bundle: Path | None,
    pad_id: int,
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 3,
    iters: int = 20,
    threads: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """{"latency": {backend: {modality: {...}}}, "throughput": ..., "errors": ...}; `on_result` is called
    with the partial result after every (backend, modality) so a cut run keeps what it measured."""
    short = {m: len(its) for m, its in items.items() if len(its) < max(batch_sizes)}
    if short:  # a batch of fewer rows than its size would report throughput for rows never run
        raise ValueError(f"batch size {max(batch_sizes)} needs as many prepared items per modality; have {short}")
    device = model.device
    result: dict[str, Any] = {"latency": {}, "throughput": {}, "errors": {}}
    for backend in backends:
        try:
            run = backend_model(backend, model, bundle, device, threads)
        except Exception as exc:  # a backend that cannot load (missing wheel, no engines) is reported, not fatal
            result["errors"][backend] = f"{type(exc).__name__}: {exc}"
            log(f"{backend}: skipped: {result['errors'][backend]}")
            continue
        for modality, its in items.items():
            for bs in batch_sizes:
                batches = _batches(its, bs, pad_id)
                n = iters if bs == 1 else max(3, iters // 4)
                times = measure(run, batches, device, warmup, n, model.dtype)
                arr = np.array(times) * 1e3
                if bs == 1:
                    result["latency"].setdefault(backend, {})[modality] = {
                        "p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
                        "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean()), "n": len(times)}
                    log(f"{backend:12s} {modality:6s} bs=1  p50 {np.percentile(arr, 50):9.2f} ms")
                result["throughput"].setdefault(backend, {}).setdefault(modality, {})[str(bs)] = {
                    "items_per_s": float(bs / np.median(times)), "median_ms": float(np.median(arr)), "n": len(times)}
            if on_result is not None:
                on_result(result)
    return result


def rows(result: dict[str, Any], baseline: str = "eager") -> list[dict[str, Any]]:
    """DESIGN.md section 7 rows: p50/p90/p99 latency and throughput per backend, ratio to the baseline."""
    out = []
    base_lat = result["latency"].get(baseline, {})
    base_thr = result["throughput"].get(baseline, {})
    for backend, per in result["latency"].items():
        for modality, stats in per.items():
            for q in ("p50", "p90", "p99"):
                b = base_lat.get(modality, {}).get(f"{q}_ms")
                v = stats[f"{q}_ms"]
                out.append({"case": f"{modality}/bs1/{q}/{backend}", "baseline": baseline, "baseline_value": b,
                            "value": v, "unit": "ms", "ratio": (v / b) if b else None, "ceiling": None,
                            "fraction_of_ceiling": None})
    for backend, per in result["throughput"].items():
        for modality, by_bs in per.items():
            for bs, stats in by_bs.items():
                b = base_thr.get(modality, {}).get(bs, {}).get("items_per_s")
                v = stats["items_per_s"]
                out.append({"case": f"{modality}/bs{bs}/throughput/{backend}", "baseline": baseline,
                            "baseline_value": b, "value": v, "unit": "items/s", "ratio": (v / b) if b else None,
                            "ceiling": None, "fraction_of_ceiling": None})
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """Batch-1 p50 bars with p90/p99 marks per modality and backend, and throughput at the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = result["latency"]
    backends = list(lat)
    modalities = sorted({m for per in lat.values() for m in per})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        xs = np.arange(len(modalities)) + i * width
        p50 = [lat[backend].get(m, {}).get("p50_ms", np.nan) for m in modalities]
        p90 = [lat[backend].get(m, {}).get("p90_ms", np.nan) for m in modalities]
        p99 = [lat[backend].get(m, {}).get("p99_ms", np.nan) for m in modalities]
        axes[0].bar(xs, p50, width, label=backend)
        axes[0].scatter(xs, p90, marker="_", color="k", s=60)
        axes[0].scatter(xs, p99, marker="x", color="k", s=20)
        thr = result["throughput"].get(backend, {})
        big = [max(thr.get(m, {"0": {}}), key=int) for m in modalities]
        axes[1].bar(xs, [thr.get(m, {}).get(b, {}).get("items_per_s", np.nan) for m, b in zip(modalities, big)],
                    width, label=backend)
    for ax, label in zip(axes, ("batch-1 latency, ms (bar p50, - p90, x p99)", "throughput at the largest batch, items/s")):
        ax.set_xticks(np.arange(len(modalities)) + width * (len(backends) - 1) / 2, modalities)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def needed_formats(backends: Sequence[str]) -> tuple[str, ...]:
    return tuple(f for b, f in (("aoti", "aoti"), ("onnxruntime", "onnx"), ("tensorrt", "onnx")) if b in backends)


def stages_for(modalities: Sequence[str]) -> tuple[str, ...]:
    out = ["decoder"]
    if any(m in ("audio", "av") for m in modalities):
        out += ["audio_tower", "beats"]
    if any(m in ("video", "av") for m in modalities):
        out.append("vision")
    return tuple(out)


def run_bench_latency(
    model: WaveModel,
    items: dict[str, list[PreparedItem]],
    pad_id: int,
    backends: Sequence[str],
    out_json: Path,
    out_png: Path | None = None,
    bundle: Path | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 3,
    iters: int = 20,
    threads: int | None = None,
    meta: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    tokenizer_dir: Path | None = None,
) -> dict[str, Any]:
    """Export what the backends need into `bundle` (when it holds no manifest yet; with the tokenizer of
    `tokenizer_dir`, so WaveEncoder can open it later), measure, and write the JSON after every (backend,
    modality), marked partial until complete, then the plot."""
    import datetime as dt
    import tempfile

    from wave_rt.export.bundle import export_model_bundle, is_bundle, versions
    from wave_rt.export.stages import stage_specs

    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    payload: dict[str, Any] = {
        "bench": "latency", "device": _device_name(model.device), "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine_load_before": machine_load(), "backends": list(backends), "modalities": list(items),
        "batch_sizes": list(batch_sizes), "warmup": warmup, "iters": iters, "dtype": str(model.dtype),
        "partial": True, **(meta or {}),
    }
    formats = needed_formats(backends)
    export_seconds: dict[str, float] = {}
    if formats:
        available = {s.name for s in stage_specs(model)}
        wanted = tuple(s for s in stages_for(list(items)) if s in available)
        if bundle is None:
            bundle = Path(tempfile.mkdtemp(prefix="wave-rt-bench-")) / "bundle"
        if is_bundle(bundle):
            from wave_rt.export.bundle import read_manifest, state_fingerprint

            manifest = read_manifest(bundle)
            if (manifest.get("config_fingerprint"), manifest.get("state_fingerprint")) != (
                    model.config.fingerprint(), state_fingerprint(model)):
                raise ValueError(f"bundle {bundle} was exported from another model (config or weights differ)")
        else:
            t0 = time.perf_counter()
            log(f"exporting {', '.join(wanted)} as {', '.join(formats)} -> {bundle}")
            export_model_bundle(model, bundle, formats=formats, stages=wanted, tokenizer_dir=tokenizer_dir)
            export_seconds["export_all"] = time.perf_counter() - t0
    payload["export_seconds"] = export_seconds
    payload["bundle"] = str(bundle) if bundle else None

    def save(result: dict[str, Any]) -> None:
        write_json(out_json, {**payload, **result, "rows": rows(result)})

    result = bench_latency(model, items, backends, bundle, pad_id, batch_sizes, warmup, iters, threads,
                           on_result=save, log=log)
    payload["machine_load_after"] = machine_load()
    payload["partial"] = False
    save(result)
    if out_png is not None and result["latency"]:
        plot(result, out_png, f"{payload['device']} | {', '.join(result['latency'])} | "
                              f"load {payload['machine_load_before']['loadavg_1_5_15']}")
    return {**payload, **result}


def _device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def prepare_items(encoder: Any, modalities: Sequence[str], n: int = 8, audio_seconds: float = 10.0,
                  video_seconds: float = 4.0, seed: int = 0) -> dict[str, list[PreparedItem]]:
    """Synthetic items of each modality through the encoder's processor (prepared once, outside timing)."""
    import wave_rt

    rng = np.random.default_rng(seed)
    words = "a dog barks while rain falls on the roof and a train passes in the distance at night".split()
    out: dict[str, list[PreparedItem]] = {}
    for m in modalities:
        if m == "text":
            its: list[Any] = [" ".join(rng.choice(words, size=int(rng.integers(6, 40)))) for _ in range(n)]
        elif m == "audio":
            t = np.arange(int(audio_seconds * 16000)) / 16000
            its = [wave_rt.Audio((0.3 * np.sin(2 * np.pi * (200 + 50 * k) * t)
                                  + 0.05 * rng.standard_normal(t.size)).astype(np.float32), sample_rate=16000)
                   for k in range(n)]
        elif m == "video":
            frames = max(2, int(video_seconds * 2))
            its = [wave_rt.Video(rng.integers(0, 255, (frames, 112, 168, 3), dtype=np.uint8), fps=2.0) for _ in range(n)]
        else:
            raise ValueError(f"bench-latency modalities are text, audio, video; got {m!r}")
        out[m] = [encoder.prepare(it, index=i) for i, it in enumerate(its)]
    return out
