"""The `wave-rt` command line.

    wave-rt embed SOURCE --out DIR [--model PATH] [--instruction TEXT] [--modality auto|text|audio|video|av]
                  [--device DEV] [--dtype fp32|fp16|bf16] [--max-batch-tokens N] [--workers N] [--engine local|ray]
    wave-rt index DIR [--kind flat|ivf|hnsw]
    wave-rt search DIR (--text TEXT | --audio FILE | --video FILE | --av FILE) [-k 10] [--instruction TEXT]
    wave-rt bench-archive SOURCE [--sample N] [--model PATH] ...
    wave-rt train CONFIG.toml [--resume]
    wave-rt eval MANIFEST [--model PATH] [--json FILE] [--device DEV]

Exit codes: 0 done (items that failed are listed in DIR/errors.jsonl and the summary), 1 error
(bad source, settings that do not match DIR, unreadable model...), 2 usage error, 130 interrupted
(re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"],
                   help="model compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="token budget per batch: batch size x longest sequence (default: the model's)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decode threads (local engine) or model replicas (ray engine)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wave-rt", description="wave_rt: omni embeddings (text, audio, video, "
                                 "audio-visual) at archive scale")
    ap.add_argument("-v", "--verbose", action="store_true", help="log details (shard commits, recoveries)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser("embed", help="embed a directory, glob or manifest into Parquet shards (resumable)",
                       description="Embed every item of SOURCE into DIR (Parquet shards, manifest.json, errors.jsonl). "
                                   "Re-run the same command after an interruption to resume.")
    e.add_argument("source", metavar="SOURCE",
                   help='a directory (media by extension, recursive), a glob, a .jsonl/.csv/.tsv/.parquet manifest '
                        '(path or text; optional id, modality, instruction), a media file, or "demo"')
    e.add_argument("--out", required=True, metavar="DIR", help="archive directory (created if missing)")
    _add_model_args(e)
    e.add_argument("--instruction", default=None, metavar="TEXT",
                   help="instruction for media items (replaces the default prompt; text items ignore it)")
    e.add_argument("--modality", default="auto", choices=["auto", "text", "audio", "video", "av"],
                   help="how to read items without a modality column (auto: by extension and streams)")
    e.add_argument("--engine", default="local", choices=["local", "ray"])
    e.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    e.add_argument("--embedding-dtype", default="float32", choices=["float32", "float16"],
                   help="type of the stored vectors")
    e.add_argument("--shard-rows", type=int, default=None, metavar="N", help="rows per Parquet shard")
    e.add_argument("--commit-every", type=float, default=60.0, metavar="SECONDS",
                   help="commit a shard at least this often (bounds the work a kill loses)")
    e.add_argument("--retry-errors", action="store_true", help="try the items of errors.jsonl again")
    e.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    e.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="progress line interval when stderr is not a terminal")

    i = sub.add_parser("index", help="build a FAISS index over an archive directory")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"])
    i.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
    i.add_argument("--cpu", action="store_true", help="never use GPU FAISS")

    s = sub.add_parser("search", help="search an archive with a text, audio or video query")
    s.add_argument("dir", metavar="DIR")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query (encoded as WAVE encodes text)")
    q.add_argument("--audio", metavar="FILE", help="audio file query")
    q.add_argument("--video", metavar="FILE", help="video file query (frames only)")
    q.add_argument("--av", metavar="FILE", help="audio-visual file query (frames and sound)")
    s.add_argument("-k", type=int, default=10, help="number of results")
    s.add_argument("--instruction", default=None, help="instruction for the query")
    s.add_argument("--device", default=None)
    s.add_argument("--json", action="store_true", help="print results as JSON lines")

    b = sub.add_parser("bench-archive", help="time each stage (decode, preprocess, model, write) on a sample")
    b.add_argument("source", metavar="SOURCE")
    _add_model_args(b)
    b.add_argument("--sample", type=int, default=64, metavar="N", help="items to time (the first N of SOURCE)")
    b.add_argument("--instruction", default=None)
    b.add_argument("--modality", default="auto", choices=["auto", "text", "audio", "video", "av"])
    b.add_argument("--json", metavar="FILE", default=None, help="also write the measurements as JSON")
    _add_train_eval_parsers(sub)
    return ap


def _add_train_eval_parsers(sub: Any) -> None:
    t = sub.add_parser("train", help="contrastive fine-tuning with GradCache (a TOML config; see wave_rt.train)")
    t.add_argument("config", metavar="CONFIG", help="TOML training config")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    v = sub.add_parser("eval", help="Recall@1/5/10, mAP and QA accuracy of a model on a pair manifest")
    v.add_argument("manifest", metavar="MANIFEST", help="pairs (jsonl/csv/parquet; see wave_rt.train.data)")
    v.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    v.add_argument("--device", default=None)
    v.add_argument("--json", metavar="FILE", default=None, help="also write the metrics as JSON")


def _cmd_train(args: argparse.Namespace, out: TextIO) -> int:
    from wave_rt.train import fit

    result = fit(args.config, resume=args.resume)
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    out.write(f"trained {result.steps} steps (last loss {last}); skipped rows: {result.skipped or 0}; "
              f"model: {result.final_model}\n")
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from wave_rt.eval import evaluate

    report = evaluate(args.manifest, args.model, device=args.device)
    out.write(report.table() + "\n")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return EXIT_OK


def _cmd_embed(args: argparse.Namespace, out: TextIO) -> int:
    from wave_rt.archive.job import embed_archive

    summary = embed_archive(
        args.source, args.out, model=args.model, instruction=args.instruction, modality=args.modality,
        device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens, workers=args.workers,
        engine=args.engine, embedding_dtype=args.embedding_dtype, shard_rows=args.shard_rows,
        commit_seconds=args.commit_every, retry_errors=args.retry_errors, progress=not args.no_progress,
        log_every=args.log_every, ray_address=args.ray_address,
    )
    if summary.nothing_to_do:
        out.write(f"nothing to do: {args.out} already holds every item of {args.source} "
                  f"({summary.rows_total:,} rows, {summary.errors_total:,} errors)\n")
    out.write(summary.table() + "\n")
    return EXIT_INTERRUPTED if summary.interrupted else EXIT_OK


def _cmd_index(args: argparse.Namespace, out: TextIO) -> int:
    from wave_rt.archive.index import Index

    index = Index.build(args.dir, kind=args.kind, nlist=args.nlist, use_gpu=False if args.cpu else None)
    out.write(f"indexed {len(index):,} rows of {args.dir} ({args.kind}, dim {index.dim}) -> "
              f"{index.out_dir / ('index-' + args.kind + '.faiss')}\n")
    return EXIT_OK


def _cmd_search(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from wave_rt.archive.index import Index
    from wave_rt.items import Audio, AudioVisual, Video

    if args.k <= 0:
        raise ValueError("-k must be positive")
    index = Index.load(args.dir)
    if args.text is not None:
        query: Any = args.text
    elif args.audio is not None:
        query = Audio(args.audio)
    elif args.video is not None:
        query = Video(args.video)
    else:
        query = AudioVisual(args.av)
    if args.device is not None:
        index.encoder(device=args.device)
    hits = index.search_items([query], k=args.k, instruction=args.instruction)[0]
    if args.json:
        for h in hits:
            out.write(json.dumps({"rank": h.rank, "score": h.score, "id": h.id, "modality": h.modality,
                                  "path": h.path, "text": h.text}) + "\n")
        return EXIT_OK
    out.write(f"{'rank':>4}  {'score':>7}  {'modality':8}  id\n")
    for h in hits:
        what = h.text if (h.modality == "text" and h.text) else (h.path or "")
        extra = f"  ({what})" if what and what != h.id else ""
        out.write(f"{h.rank:>4}  {h.score:7.4f}  {h.modality:8}  {h.id}{extra}\n")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from wave_rt.archive.stagebench import bench_archive

    report = bench_archive(args.source, model=args.model, sample=args.sample, instruction=args.instruction,
                           modality=args.modality, device=args.device, dtype=args.dtype,
                           max_batch_tokens=args.max_batch_tokens, workers=args.workers)
    out.write(report.table() + "\n")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return EXIT_OK


COMMANDS = {"embed": _cmd_embed, "index": _cmd_index, "search": _cmd_search, "bench-archive": _cmd_bench,
            "train": _cmd_train, "eval": _cmd_eval}


def run(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Parse and run; returns the exit code (never exits the interpreter)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=err)
    from wave_rt.errors import WaveRTError

    try:
        return COMMANDS[args.command](args, out)
    except KeyboardInterrupt:
        err.write("interrupted; re-run the same command to resume\n")
        return EXIT_INTERRUPTED
    except (WaveRTError, ValueError, FileNotFoundError) as exc:
        err.write(f"wave-rt {args.command}: error: {exc}\n")
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (`wave-rt`)."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
