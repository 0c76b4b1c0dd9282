"""Reproduce the trained demo model: corpus -> training -> held-out evaluation -> bundled weights.

    python -m wave_rt.train.demo --work /tmp/demo-build [--install]

1. generates the training corpus (seed 0) and a held-out corpus of the same classes (seed 1) with
   wave_rt.train.demo_corpus;
2. trains the bundled tiny architecture (the one `wave_rt.model.demo_architecture.random_demo_checkpoint` builds: 4-layer, 64-wide
   Qwen2.5-Omni thinker with BEATs and the WAVE all-layer fusion head) from random weights with the config
   wave_rt/assets/demo_model/train.toml (every parameter trained: it starts from random weights);
3. evaluates the held-out corpus (`wave-rt eval`), writing <work>/demo_eval.json;
4. with --install, copies the merged model into wave_rt/assets/demo_model/ (what `--model demo` loads
   once the held-out R@1 passes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
CONFIG_NAME = "train.toml"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_corpora(work: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    from wave_rt.train.demo_corpus import generate_corpus

    train = work / "corpus-train"
    heldout = work / "corpus-heldout"
    if not (train / "manifest.jsonl").exists():
        generate_corpus(train, seed=0, n_per_class=n_train)
    if not (heldout / "manifest.jsonl").exists():
        generate_corpus(heldout, seed=1, n_per_class=n_heldout)
    return train / "manifest.jsonl", heldout / "manifest.jsonl"


def demo_config(work: Path, train_manifest: Path, config_file: Path = ASSET_DIR / CONFIG_NAME,
                overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    import tomllib

    from wave_rt.train.config import TrainConfig

    data = tomllib.loads(config_file.read_text())
    data.setdefault("data", {})["train"] = str(train_manifest)
    data.setdefault("run", {})["out_dir"] = str(work / "run")
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wave_rt.train.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path, help="working folder (corpora, run, eval)")
    ap.add_argument("--n-train", type=int, default=24, help="training clips per caption class")
    ap.add_argument("--n-heldout", type=int, default=2, help="held-out clips per caption class")
    ap.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--install", action="store_true", help="copy the trained model into the package assets")
    ap.add_argument("--eval-json", type=Path, default=None, help="also write the held-out metrics here")
    args = ap.parse_args(argv)

    from wave_rt.eval import evaluate
    from wave_rt.train.trainer import fit

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_manifest, heldout_manifest = build_corpora(work, args.n_train, args.n_heldout)
    overrides = {"optim": {"max_steps": args.max_steps}} if args.max_steps else None
    result = fit(demo_config(work, train_manifest, overrides=overrides), resume=args.resume)
    report = evaluate(heldout_manifest, str(result.final_model), device="cpu")
    print(report.table())
    payload = report.to_dict()
    payload["model"] = "wave_rt demo model (python -m wave_rt.train.demo)"
    payload["training"] = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None}
    for out in [work / "demo_eval.json"] + ([args.eval_json] if args.eval_json else []):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.install:
        ASSET_DIR.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            shutil.copyfile(result.final_model / name, ASSET_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
