"""Batch-1 latency and batched throughput of the export backends against eager PyTorch on one config:
eager stage modules, torch.compile, AOTInductor, ONNX Runtime (CPU EP here, CUDA EP with IO binding on a
GPU with onnxruntime-gpu), through wave_rt.export.bench_latency (the same code `wave-rt bench-latency`
runs). Weights are random (no checkpoint is downloadable); items are synthetic with real shapes: texts
of 8-64 tokens and 10 s audio (Whisper mel + BEATs fbank, WAVE's doubled audio tokens).

    python bench/bench_export.py --config small                           # CPU: eager, compile, aoti, onnxruntime
    python bench/bench_export.py --config 7b --backends eager,aoti        # GPU, one step per backend
    python bench/bench_export.py --config 7b --backends eager,onnxruntime # GPU, needs onnxruntime-gpu

Every run measures eager in the same process, so each JSON's ratios compare like with like. On the CPU
the numbers are ratios on a shared machine (the JSON records its load average before and after); absolute
latencies are only meaningful from the GPU runs. The GPU runs use fp16 for every backend (ONNX Runtime's
CUDA EP has no bf16 kernels for most of these ops), the CPU runs fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BACKENDS = ("eager", "compile", "aoti", "onnxruntime", "tensorrt")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "7b"], default="small")
    ap.add_argument("--backends", default="eager,compile,aoti,onnxruntime")
    ap.add_argument("--modalities", default="text,audio")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--items", type=int, default=8, help="items per modality (cycled through)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and ONNX Runtime (on a shared CPU, 1 keeps runs comparable)")
    ap.add_argument("--bundle", default=None, help="reuse / export into this bundle directory")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/export_latency_<config>_<dev>...)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output path, run nothing")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    modalities = [m for m in args.modalities.split(",") if m]
    if not backends or set(backends) - set(BACKENDS):
        ap.error(f"--backends must name some of {', '.join(BACKENDS)}")
    if not modalities or set(modalities) - {"text", "audio"}:
        ap.error("--modalities must name some of text, audio")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from harness import RESULTS, dry_run_report

    tag = "" if backends == ["eager", "compile", "aoti", "onnxruntime"] else "_" + "_".join(b for b in backends if b != "eager")
    if args.dry_run:
        import importlib.util

        dev = "cuda" if args.device is None or "cuda" in str(args.device) else "cpu"
        out = Path(args.out) if args.out else RESULTS / f"export_latency_{args.config}_{dev}{tag}.json"
        missing = [m for m in ("torch", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        print(f"dry-run bench_export.py: config {args.config}, backends {backends}, modalities {modalities}, "
              f"batch sizes {batch_sizes}; missing modules: {missing or 'none'}")
        raise SystemExit(dry_run_report("bench_export.py", [out, out.with_suffix(".png")]) or (1 if missing else 0))

    import torch
    from bench_model import Workload, make_items, small_config
    from harness import git_commit
    from presets import QWEN_TOKEN_IDS, omni_7b_config_dict
    from wave_rt.export.bench_latency import run_bench_latency

    from wave_rt.config import WaveConfig
    from wave_rt.model.wave_model import WaveModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dev = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"export_latency_{args.config}_{dev}{tag}.json"
    cfg = small_config() if args.config == "small" else WaveConfig.from_dict(omni_7b_config_dict())
    model = WaveModel.build(cfg, device=device, dtype=dtype, init="random", seed=0)
    n = max(args.items, *batch_sizes)  # a batch larger than the items would time rows never run
    work = Workload(texts=n if "text" in modalities else 0, audios=n if "audio" in modalities else 0,
                    audio_seconds=10.0, videos=0, avs=0, video_seconds=0.0, frame_hw=(28, 28))
    by_mod: dict[str, list] = {}
    for p in make_items(cfg, work):
        by_mod.setdefault(p.modality, []).append(p)
    run_bench_latency(
        model, by_mod, QWEN_TOKEN_IDS["<|endoftext|>"], backends, out, out.with_suffix(".png"),
        bundle=Path(args.bundle) if args.bundle else None, batch_sizes=batch_sizes, warmup=args.warmup,
        iters=args.iters, threads=args.threads,
        meta={"command": "python bench/bench_export.py " + " ".join(argv or sys.argv[1:]), "commit": git_commit(),
              "config": args.config, "torch_threads": torch.get_num_threads(), "ort_threads": args.threads,
              "items": "texts of 8-64 tokens; 10 s audio (random mel/fbank, real shapes)"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
