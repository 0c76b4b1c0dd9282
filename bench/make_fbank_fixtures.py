"""Golden BEATs fbank values from torchaudio itself, as test fixtures.

BEATs computes its input with `torchaudio.compliance.kaldi.fbank(wav * 2**15, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10)` and normalizes with (x - 15.41663) / (2 * 6.55582).
Our CPU test environment has no torchaudio build, and kaldi-native-fbank (the reference that runs in every test)
refuses 128 bins at a 512-point FFT; these fixtures hold torchaudio's own output at BEATs' exact setting.
tests/media/test_media_audio_features.py reads them.

    python3 bench/make_fbank_fixtures.py --out DIR            # needs torch + a matching torchaudio, safetensors
    python3 bench/make_fbank_fixtures.py --out DIR --dry-run  # checks arguments and the output folder only
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from fixture_cli import parse_fixture_args

LENGTHS = (32000, 80123, 401, 48077)  # samples: 2 s, an odd 5 s, one frame, 3 s
FILE = "beats_fbank_torchaudio.safetensors"


def main(argv: list[str] | None = None) -> int:
    args, out = parse_fixture_args(__doc__, argv)
    if args.dry_run:
        print(f"dry run: waveforms {LENGTHS} seed {args.seed} -> {out / FILE}")
        return 0
    try:
        import torchaudio.compliance.kaldi as kaldi
    except ImportError:
        print("cannot make the fixtures here: pip install torchaudio (the build matching torch)", file=sys.stderr)
        return 2
    import torch
    import torchaudio
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for i, n in enumerate(LENGTHS):
        t = torch.arange(n, dtype=torch.float64) / 16000.0
        wav = (0.3 * torch.sin(2 * torch.pi * (180 + 97 * i) * t)
               + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
        ref = kaldi.fbank(wav.double()[None] * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25,
                          frame_shift=10)
        tensors[f"wav.{i}"] = wav
        tensors[f"fbank.{i}"] = ((ref - 15.41663) / (2 * 6.55582)).float().contiguous()  # values ~1: fp32 keeps 1e-7
    tmp = out / (FILE + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / FILE)
    manifest = {"file": FILE, "lengths": list(LENGTHS), "seed": args.seed,
                "dtype": "computed in float64, stored as float32",
                "versions": {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                             "python": platform.python_version()},
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "beats_fbank_torchaudio.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    print(f"wrote {out / FILE} ({len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
