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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter inputs (smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch (and native kernel) threads; default: torch's")
    args = ap.parse_args()
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
