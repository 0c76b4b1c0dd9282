"""Model stage with deferred (GPU) features vs CPU features, on the same weights and media, in the same run.

- CPU features (today's path, the baseline): each item's Whisper log-mel + BEATs fbank and Qwen-VL resize /
  normalize / patchify are computed per item on the host while preparing; the model stage collates them,
  copies them and runs the forward.
- deferred features (WaveProcessor defer_features, wave_rt.embed.batch_features): items carry the decoded
  float32 waveform and uint8 frames; the model stage computes every batch's features in batched calls on the
  model's device before collating, then runs the same forward.

Media: random 10 s audio (16 kHz) and 30 s video at 2 fps of 480x854 uint8 frames (smart-resized to 308x560),
both decoded already (decoding is bench_media.py's). Rows: the model stage's items/s either way (stage +
forward, encode()'s loop), the CPU feature time per item (prepare, this process's torch threads), the batched
feature time on the device alone, the bytes an item carries each way, and the parity of the two paths (feature
max abs differences, minimum cosine of the embeddings).

    python bench/bench_features.py --config 7b          # GPU
    python bench/bench_features.py --config small       # CPU or GPU, a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import run_ours, small_config  # noqa: E402
from harness import device_name, row, sync, time_it, write_result  # noqa: E402
from presets import QWEN_TOKEN_IDS, omni_7b_config_dict  # noqa: E402

import wave_rt  # noqa: E402
from wave_rt.config import WaveConfig  # noqa: E402
from wave_rt.embed.batch_features import featurize_batch  # noqa: E402
from wave_rt.embed.encoder import WaveEncoder  # noqa: E402
from wave_rt.embed.processor import WaveProcessor  # noqa: E402
from wave_rt.model.wave_model import WaveModel  # noqa: E402

MODALITIES = ("audio", "video")
# (items, seconds) per modality and config; video frames are 480p at 2 fps
WORKLOADS = {"7b": {"audio": (64, 10.0), "video": (8, 30.0)}, "small": {"audio": (8, 10.0), "video": (2, 8.0)}}
FRAME_HW = (480, 854)


class QwenIdsTokenizer:
    """Qwen's special-token ids (the random 7B config's) and one id per byte for prompt text: the processor's
    tokenizer contract without a 151k-entry vocabulary (only sequence lengths matter here)."""

    def token_to_id(self, token: str) -> int | None:
        return QWEN_TOKEN_IDS.get(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(ids=list(text.encode()))


def media_items(modality: str, n: int, seconds: float, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if modality == "audio":
        return [wave_rt.Audio((0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), sample_rate=16000)
                for _ in range(n)]
    t = int(seconds * 2)
    return [wave_rt.Video(torch.from_numpy(rng.integers(0, 256, (t, *FRAME_HW, 3), dtype=np.uint8)), fps=2.0)
            for _ in range(n)]


def nbytes(p) -> int:
    it = p.inputs
    ts = [t for s in it.audio for t in (s.mel, s.fbank, s.waveform) if t is not None]
    ts += [t for t in (it.pixel_values, it.frames) if t is not None]
    return sum(t.numel() * t.element_size() for t in ts)


def feature_diffs(eager: list, done: list) -> dict[str, float]:
    out = {"mel": 0.0, "fbank": 0.0, "pixel_values": 0.0}
    for e, d in zip(eager, done):
        for a, b in zip(e.audio, d.audio):
            out["mel"] = max(out["mel"], float((a.mel - b.mel.cpu()).abs().max()))
            if a.fbank is not None:
                out["fbank"] = max(out["fbank"], float((a.fbank - b.fbank.cpu()).abs().max()))
        if e.pixel_values is not None:
            out["pixel_values"] = max(out["pixel_values"], float((e.pixel_values - d.pixel_values.cpu()).abs().max()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(WORKLOADS), default="small")
    ap.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of audio,video")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output path, run nothing")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: the encoder's for the device")
    args = ap.parse_args(argv)
    wanted = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if not wanted or set(wanted) - set(MODALITIES):
        ap.error(f"--modalities must name some of {', '.join(MODALITIES)}; got {args.modalities!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suffix = f"{args.config}_{'cuda' if args.dry_run else device.type}"
    if args.dry_run:
        from harness import RESULTS, dry_run_report

        out = RESULTS / f"features_{suffix}.json"
        print(f"dry-run bench_features.py: would run config={args.config} modalities={wanted} -> {out}")
        raise SystemExit(dry_run_report("bench_features.py", [out]))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = small_config() if args.config == "small" else WaveConfig.from_dict(omni_7b_config_dict())
    model = WaveModel.build(cfg, device=device, dtype=dtype, init="random", seed=0)
    processor = WaveProcessor(cfg, QwenIdsTokenizer())
    encoder = WaveEncoder(model, processor, model_id=f"random-{args.config}", packed=True)
    budget = args.max_batch_tokens or encoder.default_max_batch_tokens
    command = "python bench/bench_features.py " + " ".join(argv if argv is not None else sys.argv[1:])
    extra = {"config": args.config, "dtype": str(dtype), "max_batch_tokens": budget,
             "torch_threads": torch.get_num_threads(), "partial": True}
    rows: list = []
    for modality in wanted:
        n, seconds = WORKLOADS[args.config][modality]
        items = media_items(modality, n, seconds)
        t0 = time.perf_counter()
        eager = [encoder.prepare(it, defer_features=False) for it in items]
        cpu_features_s = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        deferred = [encoder.prepare(it, defer_features=True) for it in items]
        deferred_prepare_s = (time.perf_counter() - t0) / n
        assert [p.num_tokens for p in eager] == [p.num_tokens for p in deferred]
        done = featurize_batch([p.inputs for p in deferred], cfg, encoder.feature_device)
        diffs = feature_diffs([p.inputs for p in eager], done)
        del done
        e_cpu, e_gpu = run_ours(encoder, eager, budget), run_ours(encoder, deferred, budget)
        cosine = float((torch.nn.functional.normalize(e_cpu, dim=-1)
                        * torch.nn.functional.normalize(e_gpu, dim=-1)).sum(-1).min())
        t_cpu = time_it(lambda b=eager: run_ours(encoder, b, budget), warmup=1, repeats=args.repeats)["median"]
        t_gpu = time_it(lambda b=deferred: run_ours(encoder, b, budget), warmup=1, repeats=args.repeats)["median"]

        def featurize_all(batch=deferred) -> None:
            featurize_batch([p.inputs for p in batch], cfg, encoder.feature_device)
            sync()

        t_feat = time_it(featurize_all, warmup=1, repeats=args.repeats)["median"]
        label = f"{modality} x{n} {seconds:g} s"
        common = {"cpu_features_seconds_per_item": cpu_features_s, "deferred_prepare_seconds_per_item": deferred_prepare_s,
                  "device_featurize_seconds_all_items": t_feat, "bytes_per_item_cpu_features": nbytes(eager[0]),
                  "bytes_per_item_deferred": nbytes(deferred[0]), "feature_max_abs_diff": diffs,
                  "min_cosine_deferred_vs_cpu_features": cosine, "items": n, "media_seconds": seconds}
        rows.append(row(f"{label}: model stage with deferred features on {device.type} vs with CPU features "
                        "precomputed, items/s", "model stage, features precomputed per item on the CPU",
                        n / t_cpu, n / t_gpu, "items/s", **common))
        rows.append(row(f"{label}: features, batched on {device.type} vs per item on the CPU, items/s",
                        f"per-item CPU features ({torch.get_num_threads()} torch threads)", 1.0 / cpu_features_s,
                        n / t_feat, "items/s"))
        print(f"{label}: stage {n / t_cpu:8.2f} -> {n / t_gpu:8.2f} it/s; features cpu {1 / cpu_features_s:8.2f} "
              f"it/s, batched {n / t_feat:8.2f} it/s; diffs {diffs}; cos>={cosine:.5f}", flush=True)
        write_result("features", rows, command, suffix=suffix, extra=extra)
    extra["partial"] = False
    print(f"wrote {write_result('features', rows, command, suffix=suffix, extra=extra)}  ({device_name()})")


if __name__ == "__main__":
    main()
