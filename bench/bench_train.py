"""Training step: GradCache + the info_nce kernel against the reference recipe (WAVE's code: the whole
contrastive batch forwarded with its graph, the full B x B logits matrix, cross-entropy both ways), at equal
contrastive batch: step time and peak memory; then the largest contrastive batch each reaches within a
fixed memory budget.

    python bench/bench_train.py                         # tiny model on the CPU (the demo architecture)
    python bench/bench_train.py --config 7b --batches 1024,4096 --chunk 64   # GPU: 7B thinker, LoRA r=128
    python bench/bench_train.py --dry-run               # check arguments and output path, run nothing

Inputs are text pairs of fixed length built from random token ids (no tokenizer or weights needed), so both
methods see exactly the same batch. On the GPU the memory is the CUDA allocator's peak and an
out-of-memory step is recorded as such (value null); on the CPU it is malloc's peak (bench/harness.py).
Results: bench/results/train_<device>.json (rows as DESIGN.md section 7; partial until the last row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _items(n: int, length: int, vocab: int, seed: int, use_head: bool) -> list[Any]:
    from wave_rt.embed.prepared import PreparedItem
    from wave_rt.model.batch import ItemInputs

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g)
        pos = torch.arange(length).expand(3, length).clone()
        out.append(PreparedItem("text", length, None, ItemInputs(ids, pos, use_head=use_head)))
    return out


def build_model(config: str, device: torch.device, lora_r: int) -> tuple[Any, Any, int]:
    """(model with the WAVE recipe's trainable set, ContrastiveLoss, vocab size)."""
    from wave_rt.config import WaveConfig
    from wave_rt.model.wave_model import WaveModel
    from wave_rt.train.adapters import add_lora, set_trainable
    from wave_rt.train.objective import ContrastiveLoss
    from wave_rt.train.recipes import get_train_recipe

    if config == "7b":
        from presets import omni_7b_config_dict

        cfg = WaveConfig.from_dict(omni_7b_config_dict("all_layer", use_beats=False))
        dtype = torch.bfloat16
        recipe = get_train_recipe("wave", {"lora_r": lora_r, "lora_alpha": 2 * lora_r, "lora_dropout": 0.0})
    else:
        import tempfile

        from wave_rt.model.demo_architecture import demo_thinker_config_dict, write_demo_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            ids = write_demo_tokenizer(tmp)
        data = demo_thinker_config_dict(ids)
        data.update(train_classify=True, classify_type="all_layer", sim_temperature=0.01,
                    wave_rt={"recipe": "all_layer"})
        cfg = WaveConfig.from_dict(data)
        dtype = torch.float32
        recipe = get_train_recipe("wave", {"lora_r": lora_r, "lora_alpha": 2 * lora_r, "lora_dropout": 0.0})
    model = WaveModel.build(cfg, device=device, dtype=dtype, seed=0)
    add_lora(model, recipe)
    for name, p in model.named_parameters():  # adapters and head train in fp32 (autocast runs bf16 matmuls)
        if ".lora_" in name or name.startswith("classify_linear"):
            p.data = p.data.float()
    set_trainable(model, recipe)
    model.train()
    return model, ContrastiveLoss(recipe.temperature).to(device), int(cfg.text_config.vocab_size)


def reference_step(model: Any, queries: list, targets: list, temperature: float, pad: int, autocast) -> float:
    """WAVE's training step: everything in one graph, logits = q d^T / t, CE over rows and columns."""
    from wave_rt.train.encode import embed_items

    q = embed_items(model, queries, pad, autocast=autocast)
    d = embed_items(model, targets, pad, autocast=autocast)
    logits = q @ d.T / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    loss.backward()
    return float(loss.detach())


def gradcache_train_step(model: Any, loss_fn: Any, queries: list, targets: list, chunk: int, pad: int,
                         autocast) -> float:
    from wave_rt.train.encode import embed_items
    from wave_rt.train.gradcache import chunked, gradcache_step

    sides = [chunked(queries, chunk), chunked(targets, chunk)]
    return float(gradcache_step(lambda c: embed_items(model, c, pad, autocast=autocast), sides, loss_fn))


def measure(fn, repeats: int) -> tuple[float | None, float | None, str | None]:
    """(median seconds, peak bytes, error) of fn() after one warm-up; an OOM is reported, not raised."""
    from harness import PeakMemory, sync

    try:
        fn()
        sync()
        times = []
        peak = 0
        for _ in range(repeats):
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.peak_bytes)
        times.sort()
        return times[len(times) // 2], float(peak), None
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, None, f"out of memory: {str(exc).splitlines()[0][:160]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--batches", default=None, help="contrastive batch sizes to compare (default tiny: 32,128; 7b: 1024,4096)")
    ap.add_argument("--chunk", type=int, default=None, help="GradCache chunk (default tiny 16, 7b 64)")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per text item")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default tiny 8, 7b 128)")
    ap.add_argument("--budget-mb", type=float, default=None,
                    help="memory budget for the largest-batch search (default tiny 256 MB, 7b: off)")
    ap.add_argument("--max-batch", type=int, default=4096, help="stop the largest-batch search here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/train_<device>.json)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output path, run nothing")
    args = ap.parse_args(argv)

    big = args.config == "7b"
    batches = [int(b) for b in (args.batches or ("1024,4096" if big else "32,128")).split(",")]
    chunk = args.chunk or (64 if big else 16)
    lora_r = args.lora_r or (128 if big else 8)
    budget = args.budget_mb if args.budget_mb is not None else (None if big else 256.0)
    from harness import RESULTS, device_name, dry_run_report, row, write_result

    out = args.out
    if args.dry_run:
        target = out or RESULTS / f"train_{args.config}_<device>.json"
        print(f"dry-run bench_train.py: config {args.config}, batches {batches}, chunk {chunk}, LoRA r {lora_r}, "
              f"seq {args.seq_len}, budget {budget} MB")
        return dry_run_report("bench_train.py", [Path(target)])
    if big and not torch.cuda.is_available():
        print("bench_train.py --config 7b needs a CUDA device", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    model, loss_fn, vocab = build_model(args.config, device, lora_r)
    pad = 0
    temperature = loss_fn.fixed_temperature
    rows: list[dict[str, Any]] = []
    command = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    suffix = f"{args.config}_{'cuda' if device.type == 'cuda' else 'cpu'}"

    def save(partial: bool) -> None:
        path = write_result("train", rows, command, suffix=suffix,
                            extra={"partial": partial, "settings": {"config": args.config, "chunk": chunk,
                                                                    "seq_len": args.seq_len, "lora_r": lora_r,
                                                                    "budget_mb": budget}})
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(path.read_text())

    def zero() -> None:
        model.zero_grad(set_to_none=True)

    for b in batches:
        queries = _items(b, args.seq_len, vocab, seed=b, use_head=True)
        targets = _items(b, args.seq_len, vocab, seed=b + 1, use_head=False)

        def ref_fn(q=queries, t=targets) -> None:
            zero()
            reference_step(model, q, t, temperature, pad, autocast)

        def ours_fn(q=queries, t=targets) -> None:
            zero()
            gradcache_train_step(model, loss_fn, q, t, chunk, pad, autocast)

        rt, rm, rerr = measure(ref_fn, args.repeats)
        ot, om, oerr = measure(ours_fn, args.repeats)
        print(f"B={b}: reference {rt} s {rm} B {rerr or ''} | gradcache(chunk {chunk}) {ot} s {om} B {oerr or ''}",
              flush=True)
        rows.append(row(f"step_time B={b}", "full-batch graph + full-matrix CE (WAVE)", rt, ot, "s",
                        higher_is_better=False, baseline_error=rerr, error=oerr, device=device_name()))
        rows.append(row(f"peak_memory B={b}", "full-batch graph + full-matrix CE (WAVE)", rm, om,
                        "bytes", higher_is_better=False, baseline_error=rerr, error=oerr))
        save(partial=True)

    if budget is not None:
        limit = budget * 2**20
        best: dict[str, int] = {}
        for name in ("reference", "gradcache"):
            b = chunk
            while b <= args.max_batch:
                q = _items(b, args.seq_len, vocab, seed=7, use_head=True)
                t = _items(b, args.seq_len, vocab, seed=8, use_head=False)
                def fn(q=q, t=t, name=name) -> None:
                    zero()
                    if name == "reference":
                        reference_step(model, q, t, temperature, pad, autocast)
                    else:
                        gradcache_train_step(model, loss_fn, q, t, chunk, pad, autocast)

                _, peak, err = measure(fn, 1)
                print(f"budget search {name} B={b}: peak {peak} B {err or ''}", flush=True)
                if err is not None or peak is None or peak > limit:
                    break
                best[name] = b
                b *= 2
        rows.append(row(f"largest_batch budget={budget:g}MB", "full-batch graph + full-matrix CE (WAVE)",
                        float(best.get("reference", 0)), float(best.get("gradcache", 0)), "rows",
                        higher_is_better=True, searched_up_to=args.max_batch))
    save(partial=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
