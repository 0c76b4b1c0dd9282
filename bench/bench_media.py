"""Media throughput: each backend and the transformers processors on the same generated inputs, as ratios
measured in one run (DESIGN.md section 7).

Rows (all on the machine that runs the script):
  audio decode   load_audio on WAV/FLAC/OGG: cpu (PyAV) vs dali (DALI CPU operators), audio-seconds/s
  whisper        whisper_log_mel vs transformers' WhisperFeatureExtractor (Qwen2.5-Omni config), audio-s/s
  fbank          beats_fbank vs a float64 numpy Kaldi fbank (torchaudio cannot be installed here)
  patchify       native fused kernel vs the torch reference path vs transformers' PIL image processor
                 (+ transformers' patchify), frames/s; the native row is what justifies csrc/video.cpp
  video clips    load_video + patchify_video end to end, clips/s: cpu vs dali (VP9, which DALI decodes on
                 the CPU) and vs a decode-everything PyAV + transformers-PIL baseline
  GPU only       with CUDA: DALI NVDEC decode of H.264 (+ AAC through PyAV, which DALI cannot decode) and
                 features on the GPU, against the CPU backend in the same run

Usage: python bench/bench_media.py [--quick]   (writes bench/results/media_<device>.json)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import row, time_it, write_result  # noqa: E402

from wave_rt.media import beats_fbank, load_audio, load_video, patchify_video, smart_resize, whisper_log_mel  # noqa: E402
from wave_rt.media.features_video import patchify_native, patchify_reference  # noqa: E402


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *args], check=True)


def make_inputs(d: Path, quick: bool) -> dict[str, Path]:
    secs = 10 if quick else 30
    vsecs = 4 if quick else 10
    audio_src = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={secs}:sample_rate=44100",
                 "-f", "lavfi", "-i", f"anoisesrc=d={secs}:c=pink:r=44100:a=0.1", "-filter_complex", "amix=inputs=2",
                 "-ac", "2"]
    out = {"wav": d / "a.wav", "flac": d / "a.flac", "ogg": d / "a.ogg"}
    ffmpeg(*audio_src, str(out["wav"]))
    ffmpeg("-i", str(out["wav"]), str(out["flac"]))
    ffmpeg("-i", str(out["wav"]), "-c:a", "libvorbis", str(out["ogg"]))
    video_src = ["-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={vsecs}"]
    out["vp9"] = d / "v.webm"
    ffmpeg(*video_src, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "60", str(out["vp9"]))
    out["h264"] = d / "v.mp4"
    ffmpeg(*video_src, "-f", "lavfi", "-i", f"sine=frequency=300:duration={vsecs}", "-c:v", "libx264",
           "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "60", "-c:a", "aac", "-shortest", str(out["h264"]))
    return out


def transformers_patchify_fn():
    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    tree = ast.parse(open(spec.origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), spec.origin, "exec"), ns)
    return ns["patchify"]


def transformers_video_features(frames: np.ndarray):
    """The transformers path that runs without torchvision: PIL image processor per frame + video patchify."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=176400)
    patchify = transformers_patchify_fn()

    def run():
        imgs = []
        for f in frames:
            img = proc.resize(np.moveaxis(f, -1, 0), size=proc.size, resample=proc.resample, factor=28)
            img = proc.normalize(proc.rescale(img, proc.rescale_factor), proc.image_mean, proc.image_std)
            imgs.append(img)
        return patchify(None, torch.from_numpy(np.stack(imgs))[None], 14, 2, 2)

    return run


def kaldi_numpy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) * 32768.0
    m = 1 + (len(x) - 400) // 160
    idx = np.arange(400)[None, :] + 160 * np.arange(m)[:, None]
    fr = x[idx]
    fr = fr - fr.mean(1, keepdims=True)
    fr = fr - 0.97 * np.concatenate([fr[:, :1], fr[:, :-1]], 1)
    fr = fr * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    p = np.abs(np.fft.rfft(fr, 512)) ** 2
    mel = lambda f: 1127.0 * np.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 129
    fm = mel(np.arange(256) * 16000 / 512)
    b = np.arange(128)[:, None]
    banks = np.maximum(0, np.minimum((fm - (lo + b * delta)) / delta, ((lo + (b + 2) * delta) - fm) / delta))
    return np.log(np.maximum(p[:, :256] @ banks.T, 1.1920929e-07))


# ---------------------------------------------------------------------------------------------- fuzz
def run_fuzz(n: int, seed: int, write_json: bool = True) -> int:
    """tests/media/media_fuzz.py's corpus at benchmark size: n mutated files through the loaders. Writes
    bench/results/media_fuzz_<device>.json as it goes (every 500 inputs, marked partial until the end)."""
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "media"))
    import media_fuzz

    report = media_fuzz.FuzzReport()
    t0 = time.perf_counter()
    seeds = media_fuzz.seed_media()
    by_format: dict[str, int] = {}
    by_mutation: dict[str, int] = {}
    done = 0
    cmd = f"python bench/bench_media.py --fuzz {n}" + (f" --fuzz-seed {seed}" if seed else "")

    def save(partial: bool) -> None:
        if not write_json:
            return
        typed = report.results + sum(report.media_errors.values())
        rows = [row("fuzz: loader runs ending in a result or a typed MediaError", "loader runs", report.runs, typed,
                    "runs", inputs=done, results=report.results, media_errors=dict(sorted(report.media_errors.items())),
                    untyped=len(report.findings)),
                row("fuzz: slowest loader run", "the 10 s allowed per input", 10.0, report.max_seconds, "s",
                    higher_is_better=False, slowest=report.slowest)]
        write_result("media_fuzz", rows, cmd, suffix="cpu" if not torch.cuda.is_available() else None, extra={
            "inputs_planned": n, "inputs_done": done, "seed": seed, "partial": partial,
            "elapsed_s": time.perf_counter() - t0, "by_format": dict(sorted(by_format.items())),
            "by_mutation": dict(sorted(by_mutation.items())), "findings": report.findings[:50],
            "limits": {"max_decode_seconds": media_fuzz.FUZZ_LIMITS.max_decode_seconds,
                       "max_seconds": media_fuzz.FUZZ_LIMITS.max_seconds}})

    for case in media_fuzz.cases(n, seed=seed, seeds=seeds):
        media_fuzz.run_case(case, report)
        done += 1
        by_format[case.fmt] = by_format.get(case.fmt, 0) + 1
        by_mutation[case.mutation] = by_mutation.get(case.mutation, 0) + 1
        if done % 500 == 0:
            save(partial=done < n)
            print(f"  {done} inputs, {len(report.findings)} findings, slowest {report.max_seconds:.2f} s",
                  flush=True)
    save(partial=False)
    over = report.max_seconds > 10.0
    print(f"fuzz: {n} inputs (seed {seed}), {report.runs} loader runs in {time.perf_counter() - t0:.0f} s: "
          f"{report.results} results, media errors {report.media_errors}, {len(report.findings)} untyped; "
          f"slowest {report.max_seconds:.2f} s ({report.slowest})")
    for f in report.findings[:20]:
        print("  FINDING", f)
    return 1 if report.findings or over else 0


# ---------------------------------------------------------------------------------------------- decode scaling
def _decode_video_item(path: str) -> int:
    from wave_rt.media.backends import cpu

    torch.set_num_threads(1)  # as the archive job's worker processes run
    cpu.DECODER_THREADS = 1
    clip = load_video(path, backend="cpu")
    return int(patchify_video(clip.frames, fps=clip.fps).pixel_values_videos.shape[0])


def _decode_audio_item(path: str) -> int:
    torch.set_num_threads(1)
    wav = load_audio(path, backend="cpu")
    return int(whisper_log_mel(wav)[0].shape[-1] + beats_fbank(wav).shape[0])


def _pool_rate(fn: Any, paths: list[str], procs: int, repeats: int) -> float:
    import concurrent.futures
    import multiprocessing
    import time

    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(fn, paths[:procs]))  # workers started and warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(fn, paths))
            times.append(time.perf_counter() - t0)
    return len(paths) / sorted(times)[len(times) // 2]


def decode_bench(args: argparse.Namespace) -> None:
    """PyAV decode + CPU features on 1..all cores (spawn processes), and with CUDA + DALI: DALI NVDEC H.264
    decode (+ GPU features) in this process. H.264 + AAC clips made here with PyAV (no ffmpeg CLI needed)."""
    import concurrent.futures
    import time

    from bench_archive import _proc_counts, _write_video

    w, h = (int(x) for x in args.size.split("x"))
    procs = _proc_counts(args.procs)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else None
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        distinct = [Path(tmp) / f"clip{k}.mp4" for k in range(min(4, args.clips))]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(distinct)) as ex:
            list(ex.map(lambda pk: _write_video(pk[1], args.seconds, (w, h), 25, True, pk[0]), enumerate(distinct)))
        paths = []
        for i in range(args.clips):
            p = Path(tmp) / f"c{i:03d}.mp4"
            shutil.copyfile(distinct[i % len(distinct)], p)
            paths.append(str(p))
        print(f"{args.clips} H.264+AAC clips {args.seconds:g} s {w}x{h} made in {time.perf_counter() - t0:.1f} s",
              flush=True)

        def save(partial: bool) -> None:
            extra = {"procs": procs, "cores": _proc_counts(None)[-1], "clip": f"{args.seconds:g} s {w}x{h} 25 fps",
                     "loadavg_before_after": [load_before, os.getloadavg()], "partial": partial,
                     "note": "CPU scaling ratios mean something only when the load average stays below the cores"}
            cmd = "python bench/bench_media.py " + " ".join(sys.argv[1:])
            doc_path = write_result("media_gpu_decode" if cuda else "media_decode", rows, cmd,
                                    suffix=None if cuda else "cpu", extra=extra)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(doc_path, out)
            print(f"wrote {out or doc_path}", flush=True)

        rates: dict[str, dict[int, float]] = {"video": {}, "audio": {}}
        for kind, fn in (("video", _decode_video_item), ("audio", _decode_audio_item)):
            for k in procs:
                rates[kind][k] = _pool_rate(fn, paths, k, args.repeats)
                r = rates[kind][k]
                print(f"PyAV {kind} decode+features, {k:2d} processes: {r:8.2f} clips/s ({r / k:.2f} per core)",
                      flush=True)
                rows.append(row(f"{kind}: PyAV decode + CPU features, {k} processes", f"{procs[0]} process",
                                rates[kind][procs[0]], r, "clips/s", clips_per_s_per_core=r / k))
            save(partial=True)
        if cuda and has_dali:
            from wave_rt.media.backends import dali
            from wave_rt.media.backends.cpu import video_index
            from wave_rt.media.limits import DEFAULT_LIMITS
            from wave_rt.media.source import as_source
            from wave_rt.media.video import sample_frame_ids

            sources = [as_source(p, DEFAULT_LIMITS) for p in paths]
            plans = []
            for src in sources:
                ix = video_index(src, DEFAULT_LIMITS)
                plans.append((src, sample_frame_ids(ix.num_frames, ix.avg_fps)))

            def dali_video(features: bool) -> float:
                times = []
                for r in range(args.repeats + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    frames = dali.decode_video_batch(plans, "mixed")
                    if features:
                        for f in frames:
                            patchify_video(f)
                    torch.cuda.synchronize()
                    if r:  # the first run builds the pipeline
                        times.append(time.perf_counter() - t0)
                return len(plans) / sorted(times)[len(times) // 2]

            all_cores = procs[-1]
            for features in (False, True):
                g = dali_video(features)
                what = "decode + GPU features" if features else "decode only (frames on the GPU)"
                print(f"DALI NVDEC H.264 {what}: {g:8.2f} clips/s", flush=True)
                rows.append(row(f"video H.264: DALI NVDEC {what}, batch {dali.MAX_BATCH}",
                                f"PyAV decode + CPU features on {all_cores} processes", rates["video"][all_cores], g,
                                "clips/s", index_seconds_excluded=True))
            rows.append(row("audio AAC: no DALI decoder (backend='auto' routes AAC to PyAV)",
                            f"PyAV decode + CPU features on {all_cores} processes", rates["audio"][all_cores],
                            rates["audio"][all_cores], "clips/s"))
        elif cuda:
            print("CUDA without DALI: no DALI rows (bench/dali_wheel.py installs it)", flush=True)
        save(partial=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter inputs (smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch (and native kernel) threads; default: torch's")
    ap.add_argument("--fuzz", type=int, default=None, metavar="N",
                    help="run N mutated media files through the loaders instead (e.g. 10000); exit 1 on a finding")
    ap.add_argument("--fuzz-seed", type=int, default=0)
    ap.add_argument("--decode", action="store_true",
                    help="instead: decode + features clips/s with 1..all processes (PyAV), and DALI NVDEC with CUDA")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="854x480")
    ap.add_argument("--procs", default=None, help="comma-separated process counts (default 1, 2, 4, ... all cores)")
    ap.add_argument("--out", default=None, help="also copy the --decode results JSON here")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output paths, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        from harness import RESULTS, dry_run_report

        outs = [RESULTS / "media.json"] + ([Path(args.out)] if args.out else [])
        raise SystemExit(dry_run_report("bench_media.py", outs))
    if args.fuzz is not None:
        raise SystemExit(run_fuzz(args.fuzz, args.fuzz_seed))
    if args.decode:
        decode_bench(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("bench_media needs ffmpeg on PATH")
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.quick)
        rep = dict(warmup=1, repeats=args.repeats)

        # ---------------------------------------------------------------- audio decode, per backend
        for kind in ("wav", "flac", "ogg"):
            path = str(inputs[kind])
            seconds = load_audio(path, backend="cpu").shape[0] / 16000
            cpu = time_it(lambda p=path: load_audio(p, backend="cpu"), **rep)["median"]
            if has_dali:
                dali = time_it(lambda p=path: load_audio(p, backend="dali"), **rep)["median"]
                rows.append(row(f"load_audio {kind} 44.1k stereo -> 16k mono: dali (CPU ops) vs cpu", "cpu (PyAV)",
                                seconds / cpu, seconds / dali, "audio-s/s"))
            else:
                rows.append(row(f"load_audio {kind} 44.1k stereo -> 16k mono: cpu", "cpu (PyAV)", seconds / cpu,
                                seconds / cpu, "audio-s/s", note="DALI not installed: no dali row"))

        # ---------------------------------------------------------------- Whisper log-mel
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                     chunk_length=300, return_attention_mask=True)
        wav = load_audio(str(inputs["wav"]))
        seconds = wav.shape[0] / 16000
        hf = time_it(lambda: fe(wav.numpy(), sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                return_tensors="np"), **rep)["median"]
        ours = time_it(lambda: whisper_log_mel(wav), **rep)["median"]
        rows.append(row(f"whisper_log_mel {seconds:.0f} s clip", "transformers WhisperFeatureExtractor (300 s padded)",
                        seconds / hf, seconds / ours, "audio-s/s"))
        full = torch.randn(300 * 16000) * 0.1
        hf = time_it(lambda: fe(full.numpy(), sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                return_tensors="np"), warmup=1, repeats=3)["median"]
        ours = time_it(lambda: whisper_log_mel(full), warmup=1, repeats=3)["median"]
        rows.append(row("whisper_log_mel 300 s segment", "transformers WhisperFeatureExtractor", 300 / hf, 300 / ours,
                        "audio-s/s"))

        # ---------------------------------------------------------------- BEATs fbank
        ref = time_it(lambda: kaldi_numpy(wav.numpy()), **rep)["median"]
        ours = time_it(lambda: beats_fbank(wav), **rep)["median"]
        rows.append(row(f"beats_fbank {seconds:.0f} s (float64)", "numpy float64 Kaldi fbank", seconds / ref,
                        seconds / ours, "audio-s/s"))

        # ---------------------------------------------------------------- patchify (native kernel's justification)
        clip = load_video(str(inputs["h264"]), backend="cpu")
        frames = clip.frames
        t = frames.shape[0]
        h, w = smart_resize(frames.shape[1], frames.shape[2])
        n = ((t + 1) // 2) * (h // 14) * (w // 14)
        out = torch.empty(n, 1176)
        native = time_it(lambda: patchify_native(frames, h, w, out), **rep)["median"]
        torch_ref = time_it(lambda: patchify_reference(frames, h, w), warmup=1, repeats=3)["median"]
        rows.append(row(f"patchify {t}x720p -> {h}x{w}: native fused kernel", "torch reference (same exact result)",
                        t / torch_ref, t / native, "frames/s"))
        if importlib.util.find_spec("PIL") is not None:
            hf_run = transformers_video_features(frames.numpy())
            hf_time = time_it(hf_run, warmup=1, repeats=3)["median"]
            rows.append(row(f"patchify {t}x720p -> {h}x{w}: native fused kernel",
                            "transformers Qwen2VLImageProcessorPil + Qwen2VL patchify", t / hf_time, t / native,
                            "frames/s"))
            rows.append(row(f"patchify {t}x720p: torch reference", "transformers Qwen2VLImageProcessorPil + patchify",
                            t / hf_time, t / torch_ref, "frames/s"))

        # ---------------------------------------------------------------- video clips end to end
        def baseline_clip(path: str):
            """decode every frame with PyAV, keep WAVE's sample, transformers-PIL features"""
            import av

            with av.open(path) as c:
                allf = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            ids = np.linspace(0, len(allf) - 1, min(max(round(len(allf) / 30 / 0.5), 1), 128), dtype=int)
            return transformers_video_features(np.stack([allf[i] for i in ids]))()

        for kind in ("vp9", "h264"):
            path = str(inputs[kind])

            def ours_clip(p=path, b="cpu"):
                c = load_video(p, backend=b)
                return patchify_video(c.frames, fps=c.fps)

            cpu = time_it(lambda: ours_clip(), warmup=1, repeats=3)["median"]
            if importlib.util.find_spec("PIL") is not None:
                base = time_it(lambda p=path: baseline_clip(p), warmup=1, repeats=3)["median"]
                rows.append(row(f"video clip {kind} 720p30 -> features: cpu backend",
                                "PyAV decode-all + transformers PIL processor", 1 / base, 1 / cpu, "clips/s"))
            if has_dali and (kind == "vp9" or cuda):
                dali = time_it(lambda: ours_clip(b="dali"), warmup=1, repeats=3)["median"]
                rows.append(row(f"video clip {kind} 720p30 -> features: dali backend ({'GPU' if cuda else 'CPU'})",
                                "cpu backend", 1 / cpu, 1 / dali, "clips/s"))

        if cuda and has_dali:
            # DALI NVDEC for H.264 video; AAC goes through PyAV (DALI has no AAC decoder); features on the GPU.
            from wave_rt.media import load_av

            def gpu_av():
                clip_ = load_av(str(inputs["h264"]), backend="dali")
                feats = patchify_video(clip_.video.frames, fps=clip_.video.fps)
                mel = whisper_log_mel(clip_.audio.cuda())
                torch.cuda.synchronize()
                return feats, mel

            def cpu_av():
                clip_ = load_av(str(inputs["h264"]), backend="cpu")
                return patchify_video(clip_.video.frames, fps=clip_.video.fps), whisper_log_mel(clip_.audio)

            g = time_it(gpu_av, warmup=1, repeats=5)["median"]
            c = time_it(cpu_av, warmup=1, repeats=3)["median"]
            rows.append(row("av clip H.264+AAC 720p30 -> video+audio features: DALI NVDEC + GPU features", "cpu backend",
                            1 / c, 1 / g, "clips/s"))

    extra = {"torch_threads": torch.get_num_threads(), "loadavg_before_after": [load_before, os.getloadavg()],
             "notes": [
        "Timings on a shared 2-core CPU: ratios are measured in the same run; absolute numbers are only indicative.",
        "CPU machine: no GPU rows; with CUDA + DALI the script adds DALI NVDEC (H.264) rows.",
        "pcm16_to_mono_float was measured against numpy (x[::ch].astype(float32) * 2**-15) before removal: "
        "0.2x mono, 1.3x stereo on 600 s of audio, below the 2x bar, so it was deleted.",
    ]}
    command = "python bench/bench_media.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "")
    path = write_result("media", rows, command,
                        suffix=None if cuda else "cpu", extra=extra)
    for r in rows:
        print(f"{r['case']:<80} {r['value']:>10.1f} {r['unit']:<10} x{r['ratio']:.2f} vs {r['baseline']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
