"""Golden Dasheng outputs from the real `dasheng` package WITH its torchaudio front end, as test fixtures.

Our CPU environment has no torchaudio build, so the unit tests compare our encoder to dasheng's on shared log-mel
input and our front end to a float64 numpy definition. This script closes the loop where torchaudio exists (the GPU
image: torch 2.11 + torchaudio 2.11): a tiny Dasheng with seeded random weights, a few seeded waveforms, and per
waveform (each alone, so the result does not depend on batch padding) the raw front-end output `front_end(wav)`
(log-mel, dB), the same with the window/filterbank rounded to bfloat16 (MiDashengLM's released buffers), and the
encoder output `model(wav, x_length)`. Everything is written to one safetensors file plus a JSON manifest that is
marked partial until the file is complete. tests/model/test_dasheng_golden.py reads them.

    python3 bench/make_dasheng_fixtures.py --out DIR            # needs torch, torchaudio, dasheng==0.0.9, einops
    python3 bench/make_dasheng_fixtures.py --out DIR --dry-run  # checks arguments and the output folder only
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from fixture_cli import parse_fixture_args

LENGTHS = (16000, 43210, 27777, 4500, 6719)  # samples; several chunks, and lengths with a masked last patch
TINY = dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True, init_values=0.5,
            patch_size=(64, 4), patch_stride=(64, 4), target_length=40)
FILE = "dasheng_golden.safetensors"


def _write_manifest(out: Path, data: dict) -> None:
    tmp = out / "dasheng_golden.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, out / "dasheng_golden.json")


def main(argv: list[str] | None = None) -> int:
    args, out = parse_fixture_args(__doc__, argv)
    plan = f"tiny Dasheng {TINY} seed {args.seed}; waveforms {LENGTHS}; -> {out / FILE}"
    if args.dry_run:
        print("dry run:", plan)
        return 0

    missing = []
    for mod, pip in (("torchaudio", "torchaudio (matching torch)"), ("einops", "einops"),
                     ("dasheng", "dasheng==0.0.9 --no-deps")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"pip install {pip}")
            break  # dasheng itself imports torchaudio: report the first cause only
    if missing:
        print("cannot make the fixtures here; " + "; ".join(missing), file=sys.stderr)
        return 2

    import dasheng
    import torch
    import torchaudio
    from dasheng.pretrained.pretrained import Dasheng
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
    from dasheng_random import randomize_constants

    manifest = {"partial": True, "plan": plan, "file": FILE, "lengths": list(LENGTHS), "config": TINY,
                "versions": {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                             "dasheng": getattr(dasheng, "__version__", "?"), "python": platform.python_version()},
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": "cpu (fp32)"}
    _write_manifest(out, manifest)

    torch.manual_seed(args.seed)
    model = Dasheng(**TINY).eval()
    randomize_constants(model)
    tensors = {f"weights.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed + 1)
    mel_module = model.front_end[0]
    window = mel_module.spectrogram.window.clone()
    fb = mel_module.mel_scale.fb.clone()
    with torch.no_grad():
        for i, n in enumerate(LENGTHS):
            t = torch.arange(n) / 16000.0
            wav = (0.3 * torch.sin(2 * torch.pi * (220 + 110 * i) * t) + 0.1 * torch.randn(n, generator=gen)).float()
            tensors[f"wav.{i}"] = wav
            mel_module.spectrogram.window.copy_(window)
            mel_module.mel_scale.fb.copy_(fb)
            tensors[f"mel.{i}"] = model.front_end(wav[None])[0].contiguous()
            tensors[f"tokens.{i}"] = model(wav[None], torch.tensor([n]))[0].contiguous()
            mel_module.spectrogram.window.copy_(window.to(torch.bfloat16).float())
            mel_module.mel_scale.fb.copy_(fb.to(torch.bfloat16).float())
            tensors[f"mel_bf16.{i}"] = model.front_end(wav[None])[0].contiguous()
        mel_module.spectrogram.window.copy_(window)
        mel_module.mel_scale.fb.copy_(fb)
    tmp = out / (FILE + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / FILE)
    manifest["partial"] = False
    _write_manifest(out, manifest)
    print(f"wrote {out / FILE} ({len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
