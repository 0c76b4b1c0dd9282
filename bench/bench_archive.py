"""Archive benchmark: items/s of `wave-rt embed` and where the time goes (decode, preprocess, model, write).

For each workload (texts, audio clips, silent videos, audio-visual clips, generated here with PyAV and
soundfile) it measures, on the same items:
  - each stage alone (bench/stagebench.py: read = the manifest parsed into items, decode, preprocess =
    features + tokens, model = token-budget batches, device-synchronized, write = the rows and one Parquet
    shard), median of --repeats;
  - the whole job end to end (embed_archive, local engine: stages overlapped), median of the repeats
    (--repeats, more where a job is shorter than --min-seconds; each repeat runs the stages, then the job,
    so machine drift falls on both sides of the ratio; the rows also give the median of the per-repeat
    ratios with a bootstrap 95% interval),
    while GPU utilization is sampled (pynvml, else nvidia-smi) on CUDA;
  - on CUDA, MFU = LLM FLOPs / time / bf16 peak, the FLOPs from wave_rt.model.flops (the one FLOP model:
    real tokens, no embedding table, causal attention per item, the trimmed last layer the packed path
    computes; encoders are not counted here, so this understates the work for audio and video), against
    an 8192^3 bf16 GEMM measured in this run, once for the model stage alone and once end to end.

Rows: "<workload>: end to end" compares the overlapped job with the same stages run one after another;
"text: fixed per-job cost" is a 16-caption job against its stages (what every job pays once);
"<workload>: <stage> ceiling" is the rate that stage alone sustains with its parallelism (ratio = how far
above the end-to-end rate it is: the bottleneck has the smallest ratio); "<workload>: LLM MFU" on CUDA.

    python bench/bench_archive.py                       # CPU: bundled demo model, small clips (~2 min)
    python bench/bench_archive.py --quick               # CPU smoke run (seconds, no JSON unless --json)
    python bench/bench_archive.py --model-config 7b     # GPU: Qwen2.5-Omni-7B thinker + BEATs + fusion MLP,
                                                        # random bf16 weights, 10 s audio and 30 s video clips
    python bench/bench_archive.py --model /ckpt/WAVE-7B # a real checkpoint

The random-weight configs get a tokenizer with Qwen's special token ids (the demo's byte-level tokenizer
renumbered): text token counts are byte counts, about 4x what Qwen's BPE gives for English captions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name, row, write_result  # noqa: E402

from wave_rt.model.flops import DecoderShape, datasheet_peak, decoder_flops, measure_gemm_tflops  # noqa: E402

STAGES = ("read", "decode", "preprocess", "model", "write")


# ---------------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    texts: int
    audios: int
    audio_seconds: float
    videos: int  # silent H.264
    avs: int  # H.264 + AAC
    video_seconds: float
    video_size: tuple[int, int]  # (width, height) as stored; the model resizes to <= 176,400 pixels
    video_fps: int
    distinct: int  # distinct clips per kind; the rest are copies (decode cost does not depend on content)


WORKLOADS = {
    "quick": Workload(texts=16, audios=2, audio_seconds=2.0, videos=1, avs=1, video_seconds=2.0,
                      video_size=(160, 120), video_fps=10, distinct=1),
    # enough items per kind that batches form while decode runs (tiny jobs measure the job's fixed costs)
    "cpu": Workload(texts=1024, audios=32, audio_seconds=10.0, videos=12, avs=12, video_seconds=6.0,
                    video_size=(320, 240), video_fps=25, distinct=3),
    "gpu": Workload(texts=512, audios=64, audio_seconds=10.0, videos=16, avs=16, video_seconds=30.0,
                    video_size=(854, 480), video_fps=25, distinct=4),
}

CAPTIONS = ["a dog barks twice near a busy road", "rain falling on a tin roof at night",
            "a violin plays a slow melody in a large hall", "a crowd cheers as the home team scores",
            "a car engine starts, idles and drives away", "birds singing at dawn in a quiet forest",
            "a woman explains how to repot a small cactus", "waves crashing on rocks during a storm"]


def _audio(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f = 180.0 + 40.0 * seed
    x = 0.3 * np.sin(2 * np.pi * f * t * (1 + 0.2 * np.sin(2 * np.pi * 0.3 * t)))
    x += 0.05 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def _frames(n: int, w: int, h: int, seed: int) -> Any:
    """Moving gradients and a bouncing box: enough motion that the H.264 stream is not trivial to decode."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        phase = i / 25.0 + seed
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = (127 + 100 * np.sin(xx / 37.0 + phase)).astype(np.uint8)
        img[..., 1] = (127 + 100 * np.sin(yy / 23.0 - 0.7 * phase)).astype(np.uint8)
        img[..., 2] = ((xx + yy + 7 * i) % 256).astype(np.uint8)
        x0 = int((w - 60) * (0.5 + 0.5 * np.sin(phase)))
        y0 = int((h - 60) * (0.5 + 0.5 * np.cos(1.3 * phase)))
        img[y0:y0 + 60, x0:x0 + 60] = (240, 240, 240)
        yield img


def _write_video(path: Path, seconds: float, size: tuple[int, int], fps: int, with_audio: bool, seed: int) -> None:
    import av

    w, h = size
    n = int(seconds * fps)
    with av.open(str(path), "w") as container:
        vs = container.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "veryfast", "crf": "26"}
        astream = container.add_stream("aac", rate=48000) if with_audio else None
        if astream is not None:
            astream.layout = "mono"
        for i, arr in enumerate(_frames(n, w, h, seed)):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if astream is not None:
            sound = _audio(seconds, 48000, seed)
            for start in range(0, len(sound), 1024):
                chunk = np.ascontiguousarray(sound[start:start + 1024])[None, :]
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                aframe.sample_rate, aframe.pts = 48000, start
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)


def generate(root: Path, w: Workload) -> dict[str, Path]:
    """One JSONL manifest per workload kind under root; returns {kind: manifest}."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}

    def replicate(kind: str, ext: str, count: int, make: Any) -> None:
        d = root / kind
        d.mkdir(exist_ok=True)
        originals = [d / f"{kind}{k:03d}{ext}" for k in range(min(w.distinct, count))]
        # the distinct clips in parallel: a 30 s 854x480 H.264 clip takes ~15 s to make, time a lent GPU waits
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(originals), os.cpu_count() or 1))) as pool:
            list(pool.map(make, originals, range(len(originals))))
        rows = []
        for i in range(count):
            p = d / f"{kind}{i:03d}{ext}"
            if not p.exists():
                shutil.copyfile(originals[i % len(originals)], p)
            rows.append({"id": f"{kind}/{p.name}", "path": str(p)})
        manifests[kind] = root / f"{kind}.jsonl"
        manifests[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))

    if w.texts:
        rows = [{"id": f"text/{i:05d}", "text": f"{CAPTIONS[i % len(CAPTIONS)]} (take {i})"} for i in range(w.texts)]
        manifests["text"] = root / "text.jsonl"
        manifests["text"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    if w.audios:
        # FLAC at 44.1 kHz: a resampling decode, the common case for archives
        replicate("audio", ".flac", w.audios,
                  lambda p, k: sf.write(p, _audio(w.audio_seconds, 44100, k), 44100, subtype="PCM_16"))
    if w.videos:
        replicate("video", ".mp4", w.videos,
                  lambda p, k: _write_video(p, w.video_seconds, w.video_size, w.video_fps, False, k))
    if w.avs:
        replicate("av", ".mp4", w.avs,
                  lambda p, k: _write_video(p, w.video_seconds, w.video_size, w.video_fps, True, 100 + k))
    return manifests


# ---------------------------------------------------------------------------------------------- models
class QwenIdTokenizer:
    """The demo's byte-level tokenizer with its special tokens renumbered to Qwen's ids, for random-weight
    configs that use Qwen's vocabulary size and special ids (only `token_to_id` and `encode` are used)."""

    def __init__(self, base: Any, qwen_ids: dict[str, int]) -> None:
        self.base = base
        self.qwen_ids = dict(qwen_ids)
        self.remap = {base.token_to_id(t): i for t, i in qwen_ids.items() if base.token_to_id(t) is not None}

    def token_to_id(self, token: str) -> int | None:
        return self.qwen_ids[token] if token in self.qwen_ids else self.base.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        from types import SimpleNamespace

        ids = self.base.encode(text, add_special_tokens=add_special_tokens).ids
        return SimpleNamespace(ids=[self.remap.get(i, i) for i in ids])


def small_config_dict() -> dict[str, Any]:
    """A small Omni thinker with Qwen's vocabulary and token ids: runs the 7B code path on a CPU."""
    from presets import QWEN_TOKEN_IDS

    from wave_rt.model.beats import BEATsConfig
    from wave_rt.model.demo_architecture import demo_thinker_config_dict

    data = demo_thinker_config_dict(QWEN_TOKEN_IDS, vocab_size=152064, hidden=256, layers=8, heads=8, kv_heads=2,
                                    audio_layers=4, vision_depth=4)
    data.update(train_classify=True, classify_type="all_layer")
    data["audio_config"]["beats_path"] = "BEATs_iter3_plus_AS2M.pt"
    data["wave_rt"] = {"recipe": "all_layer", "beats": BEATsConfig.tiny().to_dict()}
    return data


def load_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from wave_rt.embed.encoder import WaveEncoder

    if args.model is not None or args.model_config == "demo":
        return WaveEncoder.from_pretrained(args.model, device=device, dtype=dtype)
    from presets import QWEN_TOKEN_IDS, omni_7b_config_dict

    from wave_rt.config import WaveConfig
    from wave_rt.embed.processor import WaveProcessor, load_tokenizer
    from wave_rt.model.demo import demo_checkpoint
    from wave_rt.model.wave_model import WaveModel

    data = omni_7b_config_dict() if args.model_config == "7b" else small_config_dict()
    cfg = WaveConfig.from_dict(data)
    model = WaveModel.build(cfg, device=device, dtype=dtype, init="random", seed=0)
    tokenizer = QwenIdTokenizer(load_tokenizer(demo_checkpoint()), QWEN_TOKEN_IDS)
    return WaveEncoder(model, WaveProcessor(cfg, tokenizer), model_id=f"random-omni-{args.model_config}")


# ---------------------------------------------------------------------------------------------- GPU sampling
class GpuSampler:
    """Samples the GPU's utilization (%) and memory in use while active: pynvml when importable, else
    `nvidia-smi -lms`; does nothing without CUDA."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.util: list[float] = []
        self.mem_mib: list[float] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def _nvml_index() -> int:
        # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        first = visible.split(",")[0].strip() if visible else ""
        index = torch.cuda.current_device()
        if first.isdigit():
            return int(visible.split(",")[index].strip())
        return index

    def __enter__(self) -> GpuSampler:
        if not torch.cuda.is_available():
            return self
        idx = self._nvml_index()
        handle, pynvml = None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        except ImportError:
            pass
        except Exception as exc:  # noqa: BLE001 - pynvml.NVMLError: no usable NVML, fall back to nvidia-smi
            print(f"pynvml unusable ({exc}); trying nvidia-smi", file=sys.stderr)
            handle = None
        if handle is not None:
            self.source = "pynvml"
            nvml = pynvml

            def poll() -> None:
                while not self._stop.is_set():
                    self.util.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                    self.mem_mib.append(nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
            return self
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(idx), "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", str(int(self.interval * 1000))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

            def read() -> None:
                assert self._proc is not None and self._proc.stdout is not None
                for line in self._proc.stdout:
                    parts = [p.strip() for p in line.split(",")]
                    if len(parts) == 2 and parts[0].replace(".", "").isdigit():
                        self.util.append(float(parts[0]))
                        self.mem_mib.append(float(parts[1]))

            self._thread = threading.Thread(target=read, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        if not self.util:
            return {"gpu_util_source": self.source, "gpu_util_mean": None}
        return {"gpu_util_source": self.source, "gpu_util_mean": statistics.fmean(self.util),
                "gpu_util_median": statistics.median(self.util), "gpu_samples": len(self.util),
                "gpu_mem_max_mib": max(self.mem_mib)}


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Pairs:
    """Alternating runs on the same items: the stages one after another (stagebench), then the whole job."""

    stage_runs: dict[str, list[float]]  # seconds per stage, one entry per repeat
    e2e: list[float]  # the whole embed_archive call per repeat: scan, embedding and the final shard commit
    report: Any  # the last repeat's stagebench report
    gpu: dict[str, Any]  # GPU utilization during the last repeat's job
    # the job's own accounting per repeat (JobSummary): forwards, busy seconds per stage, setup and embedding
    # wall time; against the stages' forwards and model seconds it tells slower forwards from lost overlap
    job_runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def serial_runs(self) -> list[float]:
        return [sum(self.stage_runs[s][r] for s in STAGES) for r in range(len(self.e2e))]


def run_pairs(kind: str, manifest: Path, items: list[Any], encoder: Any, args: argparse.Namespace, work: Path,
              repeats: int, min_seconds: float) -> Pairs:
    """`repeats` pairs, more where a job is shorter than `min_seconds` (like timeit's autorange: a short job's
    ratio is noisy on a shared machine). The stages and the job alternate, so that a slow spell of the machine
    (a shared VM's neighbours, clocks) lands on both sides of the ratio instead of on whichever ran during it."""
    from stagebench import bench_archive

    from wave_rt.archive.job import embed_archive

    budget = args.max_batch_tokens or encoder.default_max_batch_tokens
    stage_runs: dict[str, list[float]] = {s: [] for s in STAGES}
    e2e: list[float] = []
    report: Any = None
    gpu: dict[str, Any] = {}
    job_runs: list[dict[str, Any]] = []
    r = 0
    while r < repeats:
        # the stages read the manifest too (timed: the job reads it), the same items as `items`
        report = bench_archive(manifest, encoder=encoder, sample=len(items), max_batch_tokens=budget,
                               workers=args.workers, run_pipeline=False)
        if report.failed:
            raise RuntimeError(f"{kind}: {report.failed} items failed to decode")
        for s in STAGES:
            stage_runs[s].append(report.stages[s].seconds)
        out = work / f"out-{kind}-{r}"
        with GpuSampler() as sampler:
            t0 = time.perf_counter()
            summary = embed_archive(manifest, out, model=encoder, max_batch_tokens=budget, workers=args.workers,
                                    progress=False)
            wall = time.perf_counter() - t0
        if summary.embedded != report.sample or summary.failed:
            raise RuntimeError(f"{kind}: the job embedded {summary.embedded} of {report.sample} items "
                               f"({summary.failed} failed)")
        e2e.append(wall)
        job_runs.append({"batches": summary.batches, "setup_seconds": summary.setup_seconds,
                         "embedding_seconds": summary.wall_seconds,
                         "busy_seconds": {k: float(v) for k, v in summary.stage_seconds.items()},
                         "first_forward_at": summary.first_forward_at,
                         "last_forward_end_at": summary.last_forward_end_at,
                         "model_active_seconds": summary.model_active_seconds})
        if r == 0 and min_seconds > 0:
            repeats = max(repeats, min(60, math.ceil(min_seconds / wall)))
        gpu = sampler.summary()
        shutil.rmtree(out, ignore_errors=True)
        r += 1
    return Pairs(stage_runs, e2e, report, gpu, job_runs)


def measure(kind: str, manifest: Path, encoder: Any, args: argparse.Namespace, work: Path,
            facts: DecoderShape | None, peak: float | None) -> list[dict[str, Any]]:
    from stagebench import sample_items

    items = sample_items(manifest, 10**9)
    budget = args.max_batch_tokens or encoder.default_max_batch_tokens
    pairs = run_pairs(kind, manifest, items, encoder, args, work, args.repeats, args.min_seconds)
    stage_runs, e2e, report, gpu = pairs.stage_runs, pairs.e2e, pairs.report, pairs.gpu
    repeats = len(e2e)
    parallel = {s: report.stages[s].parallel for s in STAGES}
    n = report.sample
    tokens = list(report.tokens)

    med = {s: statistics.median(v) for s, v in stage_runs.items()}
    t_e2e = statistics.median(e2e)
    rate = n / t_e2e
    serial = n / sum(med.values())
    serial_runs = pairs.serial_runs
    paired = [a / b for a, b in zip(serial_runs, e2e)]
    media_s = report.media_seconds
    extra: dict[str, Any] = {"items": n, "tokens": sum(tokens), "tokens_per_item_mean": sum(tokens) / n,
                             "media_seconds": media_s, "media_seconds_per_s": media_s / t_e2e,
                             "end_to_end_seconds_runs": e2e, "serial_seconds_runs": serial_runs,
                             "ratio_runs": paired, "ratio_paired_median": statistics.median(paired),
                             "ratio_paired_median_ci95": _bootstrap_median_ci(paired), "repeats": repeats,
                             "max_batch_tokens": budget, "workers": report.workers,
                             "stage_model_batches": report.model_batches, "job_runs": pairs.job_runs,
                             **gpu}
    mfu_model = mfu_e2e = achieved = None
    if facts is not None:
        flops = decoder_flops(tokens, facts, last_layer_trimmed=True)
        achieved = flops / med["model"] / 1e12
        extra["llm_prefill_tflop"] = flops / 1e12
        extra["llm_tflops_model_stage"] = achieved
        extra["llm_tflops_end_to_end"] = flops / t_e2e / 1e12
        if peak:
            mfu_model = achieved / peak
            mfu_e2e = flops / t_e2e / 1e12 / peak
            extra["mfu_model_stage"], extra["mfu_end_to_end"] = mfu_model, mfu_e2e
        sheet = datasheet_peak(device_name()) if torch.cuda.is_available() else None
        if sheet:  # DESIGN.md section 7: beside the measured peak, the datasheet's
            extra["datasheet_bf16_tflops"] = sheet
            extra["mfu_model_stage_datasheet"] = achieved / sheet
            extra["mfu_end_to_end_datasheet"] = flops / t_e2e / 1e12 / sheet
        # the FLOPs count real tokens only; a packed forward computes no padding, a padded one's share is unknown here
        extra["padding_fraction"] = 0.0 if getattr(encoder, "packed", False) else None
    rows = [row(f"{kind}: end to end (local engine, stages overlapped)", "the same stages one after another",
                serial, rate, "items/s", **extra)]
    for s in STAGES:
        ceiling_rate = n * parallel[s] / med[s] if med[s] > 0 else float("inf")
        rows.append(row(f"{kind}: {s} ceiling ({parallel[s]} in parallel)", "end to end", rate, ceiling_rate,
                        "items/s", busy_seconds=med[s], busy_seconds_runs=stage_runs[s],
                        ms_per_item=1000.0 * med[s] / n))
    if peak and achieved is not None:
        rows.append(row(f"{kind}: LLM prefill MFU, model stage alone", "bf16 GEMM 8192^3 measured in this run", peak, achieved,
                        "TFLOP/s", ceiling_value=peak, mfu_end_to_end=mfu_e2e))
    stage_txt = "  ".join(f"{s} {1000 * med[s] / n:7.2f} ms" for s in STAGES)
    mfu_txt = f"  MFU model {mfu_model:.1%} / end to end {mfu_e2e:.1%}" if mfu_model is not None else ""
    util = gpu.get("gpu_util_mean")
    util_txt = f"  GPU util {util:.0f}%" if util is not None else ""
    ci = extra["ratio_paired_median_ci95"]
    ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    print(f"{kind:6s} {n:4d} items  {rate:8.2f} items/s (serial {serial:7.2f}, x{rate / serial:.3f}; paired median "
          f"x{extra['ratio_paired_median']:.3f}{ci_txt} over {repeats} repeats)  media {media_s / t_e2e:7.1f} s/s  "
          f"busy/item: {stage_txt}{mfu_txt}{util_txt}", flush=True)
    print(f"{'':6s} {job_timeline(pairs.job_runs[-1], e2e[-1])} (stages: {report.model_batches} forwards, "
          f"model {stage_runs['model'][-1]:.3f} s)", flush=True)
    return rows


def job_timeline(job: dict[str, Any], e2e: float) -> str:
    """Where a job's wall time went: setup, the lead-in before its first forward, the forwards' span (of which
    some forward ran for ..., the rest the model waited for input), the tail after the last forward."""
    text = (f"job: {job['batches']} forwards, setup {job['setup_seconds']:.3f} s, embedding "
            f"{job['embedding_seconds']:.3f} s of {e2e:.3f} s")
    first, last, active = job.get("first_forward_at"), job.get("last_forward_end_at"), job.get("model_active_seconds")
    if first is None or last is None or active is None:
        return text + f", model busy {job['busy_seconds'].get('model', 0.0):.3f} s"
    return text + (f" = lead-in {first:.3f} s + forwards {last - first:.3f} s (running {active:.3f} s, waiting "
                   f"{max(0.0, last - first - active):.3f} s) + tail {job['embedding_seconds'] - last:.3f} s")


def _bootstrap_median_ci(values: list[float], draws: int = 2000) -> list[float] | None:
    """95% interval of the median by resampling (fixed seed); None for fewer than 5 values."""
    if len(values) < 5:
        return None
    rng = np.random.default_rng(0)
    arr = np.asarray(values)
    meds = np.sort(np.median(rng.choice(arr, size=(draws, len(arr))), axis=1))
    return [float(meds[int(0.025 * draws)]), float(meds[int(0.975 * draws) - 1])]


def fixed_cost(manifest: Path, encoder: Any, args: argparse.Namespace, work: Path, items: int = 16) -> dict[str, Any]:
    """The job's fixed cost: a job of the first `items` captions against its stages run one after another
    (serial and job alternate; 3x --repeats pairs, each small). What is left is what every job pays once:
    the source scan, the manifest and journal writes, threads, the final commit."""
    from stagebench import sample_items

    small = work / "text-fixed.jsonl"
    small.write_text("".join(manifest.read_text().splitlines(keepends=True)[:items]))
    pairs = run_pairs("text-fixed", small, sample_items(small, items), encoder, args, work, 3 * args.repeats, 0.0)
    serial, e2e = pairs.serial_runs, pairs.e2e
    fixed_ms = statistics.median([1000 * (a - b) for a, b in zip(e2e, serial)])
    print(f"text   fixed per-job cost: {fixed_ms:.1f} ms ({items} captions: job {1000 * statistics.median(e2e):.1f} ms, "
          f"stages {1000 * statistics.median(serial):.1f} ms)", flush=True)
    return row(f"text: fixed per-job cost ({items} captions)", "the same stages one after another",
               1000 * statistics.median(serial), 1000 * statistics.median(e2e), "ms", higher_is_better=False,
               fixed_ms=fixed_ms, end_to_end_ms_runs=[1000 * x for x in e2e], serial_ms_runs=[1000 * x for x in serial])


def stage_scaling(kind: str, manifest: Path, encoder: Any, procs: list[int], repeats: int,
                  min_items: int = 96) -> list[dict[str, Any]]:
    """The archive job's decode + features + tokens stage (prepare_pool, what the job runs for media items)
    with 1..N worker processes on the same items: items/s, per core, and the ratio to one process."""
    from stagebench import sample_items

    from wave_rt.archive.prepare import PreparedEntry
    from wave_rt.archive.prepare_pool import PreparePool, preparer_spec

    # A run must be long against one item (ramp-up and the last item's tail are idle time for all but one worker):
    # the workload's clips are cycled to at least min_items, the same list for every process count.
    clips = sample_items(manifest, 10**9)
    items = list(enumerate(clips * max(1, -(-min_items // len(clips)))))
    spec = preparer_spec(encoder)
    if spec is None:
        raise RuntimeError("the encoder cannot be sent to worker processes")
    rates: dict[int, float] = {}
    runs: dict[int, list[float]] = {}
    cpu: dict[int, dict[str, float | None]] = {}
    for k in procs:
        with PreparePool(spec, None, k, item_timeout=None) as pool:
            list(pool.imap(items[:k] * 2))  # every worker started, imported and warm before the clock starts
            times, worker_cpu, parent_cpu = [], [], []
            for _ in range(repeats):
                w0, p0 = _cpu_seconds(pool.pids()), time.process_time()
                t0 = time.perf_counter()
                outs = list(pool.imap(items))  # the pool's default window keeps every worker's next item queued
                times.append(time.perf_counter() - t0)
                w1, p1 = _cpu_seconds(pool.pids()), time.process_time()
                worker_cpu.append(None if w0 is None or w1 is None else w1 - w0)
                parent_cpu.append(p1 - p0)
                bad = [o for o in outs if not isinstance(o, PreparedEntry)]
                if bad:
                    raise RuntimeError(f"{kind}: {len(bad)} items failed: {bad[0]}")
        runs[k] = times
        rates[k] = len(items) / statistics.median(times)
        i = times.index(statistics.median(times)) if repeats % 2 else 0
        wc = worker_cpu[i]
        # busy = worker CPU / (wall x processes): 1.0 means every worker kept one core busy the whole time;
        # above 1 would mean a worker used more than one core (threads), which the pool must not allow
        cpu[k] = {"worker_cpu_ms_per_item": None if wc is None else 1000 * wc / len(items),
                  "worker_busy_fraction": None if wc is None else wc / (times[i] * k),
                  "parent_cpu_ms_per_item": 1000 * parent_cpu[i] / len(items)}
        busy = cpu[k]["worker_busy_fraction"]
        print(f"{kind:6s} prepare stage, {k:2d} processes: {rates[k]:8.2f} items/s ({rates[k] / k:.2f} per core, "
              f"x{rates[k] / rates[procs[0]]:.2f} vs {procs[0]}); workers busy "
              f"{'n/a' if busy is None else f'{busy:.0%}'}, parent {cpu[k]['parent_cpu_ms_per_item']:.2f} ms CPU/item",
              flush=True)
    return [row(f"{kind}: decode+features stage, {k} worker processes", f"{procs[0]} worker process",
                rates[procs[0]], rates[k], "items/s", items_per_s_per_core=rates[k] / k, seconds_runs=runs[k],
                items=len(items), **cpu[k]) for k in procs]


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of these processes so far (Linux /proc); None where unreadable."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _proc_counts(spec: str | None) -> list[int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if spec:
        return [int(x) for x in spec.split(",")]
    counts, k = [], 1
    while k < cores:
        counts.append(k)
        k *= 2
    return counts + [cores]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: --model-config)")
    ap.add_argument("--model-config", choices=["demo", "small", "7b"], default=None,
                    help="demo: the bundled demo model (CPU default); small: random small Omni with Qwen ids; "
                         "7b: random full-size Omni-7B + BEATs (GPU default)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                    help="clip counts and lengths (default: gpu on CUDA, else cpu)")
    ap.add_argument("--quick", action="store_true", help="the quick workload (a smoke run; no JSON unless --json)")
    ap.add_argument("--kinds", default="text,audio,video,av", help="comma-separated subset of text,audio,video,av")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=10.0,
                    help="per kind, at least this much end-to-end job time: a short job runs more repeats (0: exactly "
                         "--repeats)")
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: the job's default)")
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: an 8192^3 GEMM measured in this run)")
    ap.add_argument("--media-dir", default=None, help="generate (or reuse) the clips here instead of a temp dir")
    ap.add_argument("--generate-only", action="store_true",
                    help="make the clips in --media-dir and stop (a GPU session makes them while the GPU works)")
    ap.add_argument("--json", action="store_true", help="write bench/results/archive_<suffix>.json "
                                                        "(default: yes, except with --quick)")
    ap.add_argument("--stage-scaling", action="store_true",
                    help="instead of the job: the decode+features stage with 1..all worker processes "
                         "(writes archive_stage_scaling_<device>.json, with the load average)")
    ap.add_argument("--procs", default=None, help="with --stage-scaling: comma-separated process counts "
                                                  "(default 1, 2, 4, ... all cores)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output paths, run nothing")
    args = ap.parse_args(argv)
    if args.repeats <= 0:
        ap.error("--repeats must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.quick:
        args.workload = "quick"
        args.min_seconds = 0.0  # a smoke run: exactly --repeats
    workload_name = args.workload or ("gpu" if cuda else "cpu")
    args.model_config = args.model_config or ("7b" if cuda else "demo")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if args.dtype else (
        torch.bfloat16 if cuda else torch.float32)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - {"text", "audio", "video", "av"}
    if unknown:
        ap.error(f"unknown kinds: {sorted(unknown)}")
    if args.dry_run:
        from harness import RESULTS, dry_run_report

        media = [Path(args.media_dir) / "probe"] if args.media_dir else []
        raise SystemExit(dry_run_report("bench_archive.py", [RESULTS / f"archive_{'_'.join(kinds)}.json", *media],
                                        [Path(args.model)] if args.model else []))
    w = WORKLOADS[workload_name]
    w = Workload(**{**w.__dict__, **{f: 0 for k, f in (("text", "texts"), ("audio", "audios"), ("video", "videos"),
                                                        ("av", "avs")) if k not in kinds}})

    tmp = Path(tempfile.mkdtemp(prefix="wave-rt-bench-archive-"))
    try:
        media_root = Path(args.media_dir) if args.media_dir else tmp / "media"
        t0 = time.perf_counter()
        stamp = media_root / f"workload-{workload_name}-{'-'.join(kinds)}.json"
        if stamp.exists():
            manifests = {k: Path(v) for k, v in json.loads(stamp.read_text()).items()}
        else:
            manifests = generate(media_root, w)
            stamp.write_text(json.dumps({k: str(v) for k, v in manifests.items()}))
        print(f"clips: {workload_name} workload in {media_root} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if args.generate_only:
            return

        t0 = time.perf_counter()
        encoder = load_encoder(args, device, dtype)
        print(f"model: {encoder.model_id} on {device} in {str(dtype).replace('torch.', '')} "
              f"({time.perf_counter() - t0:.1f} s to build/load); {device_name()}", flush=True)
        if args.stage_scaling:
            procs = _proc_counts(args.procs)
            load_before = os.getloadavg()
            rows = []
            for kind in [k for k in kinds if k in manifests and k != "text"]:
                rows += stage_scaling(kind, manifests[kind], encoder, procs, args.repeats)
            if args.quick and not args.json:
                return
            cmd = "python bench/bench_archive.py " + " ".join(argv if argv is not None else sys.argv[1:])
            path = write_result("archive_stage_scaling", rows, cmd, suffix=device.type, extra={
                "model": encoder.model_id, "workload": w.__dict__, "repeats": args.repeats, "procs": procs,
                "cores": _proc_counts(None)[-1], "loadavg_before_after": [load_before, os.getloadavg()],
                "note": "scaling ratios are meaningful only when the load average stays below the core count"})
            print(f"wrote {path}", flush=True)
            return
        facts = DecoderShape.of(encoder.model.model)
        peak = args.peak_tflops or (measure_gemm_tflops(device) if cuda else None)
        rows: list[dict[str, Any]] = []
        todo = [k for k in kinds if k in manifests]
        for i, kind in enumerate(todo):
            rows += measure(kind, manifests[kind], encoder, args, tmp, facts, peak)
            if kind == "text":
                rows.append(fixed_cost(manifests[kind], encoder, args, tmp))
            if args.json or not args.quick:
                # after every kind: a run cut off by its time cap keeps the kinds it finished, marked partial
                cmd = "python bench/bench_archive.py " + " ".join(argv if argv is not None else sys.argv[1:])
                suffix = f"{args.model_config if args.model is None else 'checkpoint'}_{workload_name}_{device.type}"
                if set(kinds) != {"text", "audio", "video", "av"}:
                    # one file per subset: the GPU stage runs text,audio then video,av, and the second must not
                    # overwrite the first (it did on the H200, 2026-11-27)
                    suffix += "_" + "_".join(kinds)
                path = write_result("archive", rows, cmd, suffix=suffix,
                                    extra={"model": encoder.model_id, "model_config": args.model_config,
                                           "dtype": str(dtype).replace("torch.", ""), "workload": w.__dict__,
                                           "repeats": args.repeats, "llm_params_no_embedding": facts.nonembedding_params,
                                           "peak_bf16_tflops": peak, "partial": i + 1 < len(todo),
                                           "kinds_done": todo[:i + 1]})
                print(f"wrote {path}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
