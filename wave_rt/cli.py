"""The `wave-rt` command line.

    wave-rt [-v] [--version] COMMAND ...      (-v/--verbose also works after COMMAND)
    wave-rt embed SOURCE --out DIR [--model PATH] [--device DEV] [--dtype fp32|fp16|bf16] [--max-batch-tokens N]
                  [--instruction TEXT] [--modality auto|text|audio|video|av] [--engine local|ray]
                  [--workers N (local: decode workers)] [--replicas N (ray: model replicas)] ...
    wave-rt index DIR [--kind auto|flat|flat-gpu|ivf|hnsw]
    wave-rt search DIR (--text TEXT | --audio FILE | --video FILE | --av FILE) [-k 10] [--instruction TEXT]
                  [--model PATH] [--device DEV] [--dtype ...]
    wave-rt train CONFIG.toml [--resume]
    wave-rt eval MANIFEST [--model PATH] [--json FILE] [--device DEV] [--qa-protocol letters|options]
    wave-rt export bundle CHECKPOINT --out BUNDLE [--formats onnx,aoti]
    wave-rt export tensorrt BUNDLE [--precision fp16|bf16|fp32]
    wave-rt export triton-repo BUNDLE --out DIR [--platform onnxruntime|tensorrt]
    wave-rt bench-latency MODEL [--backends eager,compile,aoti,onnxruntime] [--out FILE.json]

Exit codes: 0 done (items that failed are listed in DIR/errors.jsonl and the summary), 1 error (a bad
option, a missing or unreadable path, an unwritable output, settings that do not match DIR, a bad model
directory...: one line on stderr; -v adds the traceback), 130 interrupted (re-run the same command to
resume).

A subcommand is one `_add_<name>` function that registers its parser and sets `func`; add it to COMMANDS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from wave_rt.archive.sources import MODALITIES

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
DTYPES = ["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]

log = logging.getLogger("wave_rt.cli")


class UsageError(Exception):
    """A bad command line: reported in one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block and exiting with 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # On subcommands the default is SUPPRESS, so that `wave-rt -v embed ...` is not reset by the subparser.
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="log details (shard commits, recoveries) and show tracebacks of errors")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model compute dtype (default: bf16 on CUDA, fp32 on CPU)")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="instruction for media items (replaces the default prompt; text items ignore it)")
    p.add_argument("--modality", default="auto", choices=MODALITIES,
                   help="how to read items without a modality column (auto: by extension and streams)")


def _check_device(device: str | None) -> None:
    """A device this process can use, or a one-line DeviceError (torch's own is an AssertionError on CPU builds)."""
    from wave_rt.dtypes import resolve_device

    resolve_device(device)


# ---------------------------------------------------------------------------------------------- embed
def _add_embed(sub: Any) -> argparse.ArgumentParser:
    e = sub.add_parser("embed", help="embed a directory, glob or manifest into Parquet shards (resumable)",
                       description="Embed every item of SOURCE into DIR (Parquet shards, manifest.json, errors.jsonl). "
                                   "Re-run the same command after an interruption to resume.")
    e.add_argument("source", metavar="SOURCE",
                   help='a directory (media by extension, recursive), a glob, a .jsonl/.csv/.tsv/.parquet manifest '
                        '(path or text; optional id, modality, instruction), a media file, or "demo"')
    e.add_argument("--out", required=True, metavar="DIR", help="archive directory (created if missing)")
    # every option below is a field of wave_rt.archive.options.JobOptions (see job_options), which checks them
    from wave_rt.archive.options import DECODE_MODES, ENGINES, JobOptions

    _add_model_args(e)
    e.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="token budget per batch: batch size x longest sequence (default: the model's)")
    _add_source_args(e)
    e.add_argument("--engine", default="local", choices=ENGINES,
                   help="local: one process, decode workers + model; ray: a pool of model replicas on a Ray cluster")
    e.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decode workers of the local engine (default: one per CPU core but one)")
    e.add_argument("--decode", default=JobOptions.decode, choices=DECODE_MODES,
                   help="where the local engine decodes media: processes (one per worker, per-item timeout) or "
                        "threads (auto: processes when the model can be sent to them)")
    e.add_argument("--item-timeout", type=float, default=JobOptions.item_timeout, metavar="SECONDS",
                   help="seconds one media item may take in a decode process before it is reported as failed")
    e.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="model replicas of the ray engine (default: one per GPU, or CPUs / 2)")
    e.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    e.add_argument("--embedding-dtype", default=JobOptions.embedding_dtype, choices=["float32", "float16"],
                   help="type of the stored vectors")
    e.add_argument("--shard-rows", type=int, default=None, metavar="N", help="rows per Parquet shard")
    e.add_argument("--commit-every", type=float, default=JobOptions.commit_seconds, metavar="SECONDS",
                   help="commit a shard at least this often (bounds the work a kill loses)")
    e.add_argument("--retry-errors", action="store_true", help="try the items of errors.jsonl again")
    e.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    e.add_argument("--log-every", type=float, default=JobOptions.log_every, metavar="SECONDS",
                   help="progress line interval when stderr is not a terminal")
    e.set_defaults(func=_cmd_embed)
    return e


# ---------------------------------------------------------------------------------------------- train / eval
def _add_train(sub: Any) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="contrastive fine-tuning with GradCache (a TOML config; see wave_rt.train)")
    t.add_argument("config", metavar="CONFIG", help="TOML training config")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.set_defaults(func=_cmd_train)
    return t


def _add_eval(sub: Any) -> argparse.ArgumentParser:
    v = sub.add_parser("eval", help="Recall@1/5/10, mAP and QA accuracy of a model on a pair manifest")
    v.add_argument("manifest", metavar="MANIFEST", help="pairs (jsonl/csv/parquet; see wave_rt.train.data)")
    v.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory (default: the bundled demo model)")
    v.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    v.add_argument("--json", metavar="FILE", default=None, help="also write the metrics as JSON")
    v.add_argument("--qa-protocol", choices=("letters", "options"), default="letters",
                   help="QA rows: 'letters' asks the question with lettered options and scores the letters (WAVE, "
                        "and WaveEncoder.answer); 'options' asks the bare question and scores the options' texts")
    v.set_defaults(func=_cmd_eval)
    return v


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

    report = evaluate(args.manifest, args.model, device=args.device, qa_protocol=args.qa_protocol)
    out.write(report.table() + "\n")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return EXIT_OK


def _add_export(sub: Any) -> argparse.ArgumentParser:
    """`wave-rt export {bundle,tensorrt,triton-repo}` (wave_rt.export)."""
    x = sub.add_parser("export", help="export engines: ONNX / AOTInductor bundles, TensorRT, a Triton repository")
    xs = x.add_subparsers(dest="export_command", metavar="WHAT")
    xs.required = True
    xb = xs.add_parser("bundle", help="stage graphs + tokenizer + manifest from a checkpoint")
    xb.add_argument("checkpoint", metavar="CHECKPOINT", help='checkpoint directory or "demo"')
    xb.add_argument("--out", required=True, metavar="DIR", help="bundle directory (created if missing)")
    xb.add_argument("--formats", default="onnx,aoti", help="comma list of onnx, aoti (default: both)")
    xb.add_argument("--stages", default=None, help="comma list (default: every stage the model has)")
    xb.add_argument("--recipe", default=None, help="embedding recipe the bundle serves (default: the checkpoint's)")
    xb.add_argument("--device", default="cpu", metavar="DEV", help="device the AOTInductor packages are compiled for")
    xb.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the exported graphs")
    xt = xs.add_parser("tensorrt", help="TensorRT engines from a bundle's ONNX graphs (needs TensorRT)")
    xt.add_argument("bundle", metavar="BUNDLE", help="a bundle directory written by `wave-rt export bundle`")
    xt.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"],
                    help="precision TensorRT may build the engines in")
    xt.add_argument("--max-batch-tokens", type=int, default=32768, metavar="N",
                    help="token budget the decoder's optimization profiles cover")
    xt.add_argument("--timing-cache", default=None, metavar="FILE", help="default: BUNDLE/tensorrt/timing.cache")
    xt.add_argument("--no-version-compatible", action="store_true",
                    help="engines tied to this TensorRT version (default: version-compatible engines)")
    xr = xs.add_parser("triton-repo", help="a Triton Inference Server model repository from a bundle")
    xr.add_argument("bundle", metavar="BUNDLE", help="a bundle directory written by `wave-rt export bundle`")
    xr.add_argument("--out", required=True, metavar="DIR", help="model repository directory (created if missing)")
    xr.add_argument("--platform", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                    help="backend of the stage models")
    xr.add_argument("--cpu", action="store_true", help="stage models on KIND_CPU instances")
    xr.add_argument("--max-batch", type=int, default=64, help="dynamic batching limit of the front model")
    xr.add_argument("--server-bundle-path", default=None, help="where the server sees BUNDLE (default: its path here)")
    x.set_defaults(func=_cmd_export)
    return x


def _add_bench_latency(sub: Any) -> argparse.ArgumentParser:
    """`wave-rt bench-latency` (wave_rt.export.bench_latency)."""
    bl = sub.add_parser("bench-latency", help="p50/p90/p99 latency at batch 1 and throughput per backend")
    bl.add_argument("model", metavar="MODEL", help='checkpoint directory or "demo"')
    bl.add_argument("--backends", default="eager,compile,aoti,onnxruntime",
                    help="comma list of eager, compile, aoti, onnxruntime, tensorrt")
    bl.add_argument("--modalities", default="text,audio", help="comma list of text, audio, video")
    bl.add_argument("--bundle", default=None, metavar="DIR", help="use (or export into) this bundle")
    bl.add_argument("--batch-sizes", default="1,8", help="comma list of batch sizes (1: latency percentiles; larger: throughput)")
    bl.add_argument("--iters", type=int, default=20, help="timed calls per case")
    bl.add_argument("--warmup", type=int, default=3, help="untimed calls per case before timing")
    bl.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    bl.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    bl.add_argument("--out", default="latency.json", metavar="FILE", help="results JSON (the PNG goes beside it)")
    bl.set_defaults(func=_cmd_bench_latency)
    return bl


def job_options(args: argparse.Namespace) -> Any:
    """The JobOptions of `wave-rt embed` (the same object the Python API builds from its keywords)."""
    from wave_rt.archive.options import JobOptions

    if args.engine == "ray" and args.workers is not None:
        raise UsageError("--workers sets the local engine's decode workers; with --engine ray use --replicas")
    return JobOptions(
        instruction=args.instruction, modality=args.modality, device=args.device, dtype=args.dtype,
        max_batch_tokens=args.max_batch_tokens, engine=args.engine, workers=args.workers, replicas=args.replicas,
        ray_address=args.ray_address, embedding_dtype=args.embedding_dtype, shard_rows=args.shard_rows,
        commit_seconds=args.commit_every, retry_errors=args.retry_errors, progress=not args.no_progress,
        log_every=args.log_every, decode=args.decode, item_timeout=args.item_timeout,
    )


def _cmd_embed(args: argparse.Namespace, out: TextIO) -> int:
    from wave_rt.archive.job import embed_archive

    options = job_options(args)
    if options.engine == "local":  # Ray workers may run where this driver has no GPU
        _check_device(options.device)
    summary = embed_archive(args.source, args.out, model=args.model, options=options)
    if summary.nothing_to_do:
        out.write(f"nothing to do: {args.out} already holds every item of {args.source} "
                  f"({summary.rows_total:,} rows, {summary.errors_total:,} errors)\n")
    out.write(summary.table() + "\n")
    return EXIT_INTERRUPTED if summary.interrupted else EXIT_OK


# ---------------------------------------------------------------------------------------------- index
def _add_index(sub: Any) -> argparse.ArgumentParser:
    i = sub.add_parser("index", help="build a search index over an archive directory",
                       description="Build a search index over the vectors of archive DIR (written into DIR).")
    i.add_argument("dir", metavar="DIR", help="an archive directory written by `wave-rt embed`")
    i.add_argument("--kind", default="auto", choices=["auto", "flat", "flat-gpu", "ivf", "hnsw"],
                   help="auto: exact search, flat-gpu (similarity_topk, torch) on CUDA or where faiss is not "
                        "installed, else FAISS flat; flat: FAISS exact inner product; ivf: inverted lists; hnsw: graph")
    i.add_argument("--nlist", type=int, default=None, metavar="N", help="IVF lists (default ~4 sqrt(N))")
    i.add_argument("--cpu", action="store_true", help="CPU only: FAISS flat for --kind auto, never GPU FAISS")
    i.set_defaults(func=_cmd_index)
    return i


def _cmd_index(args: argparse.Namespace, out: TextIO) -> int:
    from wave_rt.archive.index import Index, exact_kind

    kind = ("flat" if args.cpu else exact_kind()) if args.kind == "auto" else args.kind
    index = Index.build(args.dir, kind=kind, nlist=args.nlist, use_gpu=False if args.cpu else None)
    saved = index.save_path()
    out.write(f"indexed {len(index):,} rows of {args.dir} ({kind}, dim {index.dim}) -> {saved}\n")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- search
def _add_search(sub: Any) -> argparse.ArgumentParser:
    s = sub.add_parser("search", help="search an archive with a text, audio or video query",
                       description="Encode one query with the archive's model and print the nearest items of DIR.")
    s.add_argument("dir", metavar="DIR", help="an archive directory written by `wave-rt embed`")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", metavar="TEXT", help="text query (encoded as WAVE encodes text)")
    q.add_argument("--audio", metavar="FILE", help="audio file query")
    q.add_argument("--video", metavar="FILE", help="video file query (frames only)")
    q.add_argument("--av", metavar="FILE", help="audio-visual file query (frames and sound)")
    s.add_argument("-k", type=int, default=10, metavar="N", help="number of results")
    s.add_argument("--instruction", default=None, metavar="TEXT", help="instruction for the query")
    p = s.add_argument_group("model (default: the archive's own, from its manifest)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory, when the archive's has moved (must be the same model)")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model compute dtype (default and only accepted value: the archive's)")
    s.add_argument("--json", action="store_true", help="print results as JSON lines")
    s.set_defaults(func=_cmd_search)
    return s


def _cmd_search(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from wave_rt.archive.index import Index
    from wave_rt.items import Audio, AudioVisual, Video

    if args.k <= 0:
        raise UsageError("-k must be positive")
    _check_device(args.device)
    index = Index.load(args.dir)
    if args.text is not None:
        query: Any = args.text
    elif args.audio is not None:
        query = Audio(args.audio)
    elif args.video is not None:
        query = Video(args.video)
    else:
        query = AudioVisual(args.av)
    encoder = None
    index.check_dtype(args.dtype)  # before a model is loaded in a dtype the archive cannot use
    if args.model is not None or args.dtype is not None:
        from wave_rt.embed.encoder import WaveEncoder

        ref = index.manifest.model_path
        path = args.model if args.model is not None else (None if ref == "demo" else ref)
        encoder = WaveEncoder.from_pretrained(path, device=args.device, dtype=args.dtype or index.manifest.dtype)
    elif args.device is not None:
        index.encoder(device=args.device)
    hits = index.search_items([query], k=args.k, instruction=args.instruction, encoder=encoder)[0]
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


# The subcommands, in --help order. Each registers its parser (with help on every option) and sets func.
COMMANDS: list[Callable[[Any], argparse.ArgumentParser]] = [_add_embed, _add_index, _add_search, _add_train,
                                                             _add_eval, _add_export, _add_bench_latency]


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    if args.export_command == "bundle":
        import torch

        from wave_rt.export.bundle import export_bundle

        ckpt = args.checkpoint
        if ckpt == "demo":
            from wave_rt.model.demo import demo_checkpoint

            ckpt = demo_checkpoint()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        stages = tuple(args.stages.split(",")) if args.stages else None
        path = export_bundle(ckpt, args.out, formats=tuple(args.formats.split(",")), stages=stages,
                             recipe=args.recipe, device=args.device, dtype=dtype)
        out.write(f"bundle written: {path}\n")
    elif args.export_command == "tensorrt":
        from wave_rt.export.tensorrt import build_engines

        for p in build_engines(args.bundle, precision=args.precision, max_batch_tokens=args.max_batch_tokens,
                               timing_cache=args.timing_cache, version_compatible=not args.no_version_compatible):
            out.write(f"engine written: {p}\n")
    else:
        from wave_rt.export.triton_repo import write_triton_repo

        path = write_triton_repo(args.bundle, args.out, platform=args.platform, gpu=not args.cpu,
                                 max_batch=args.max_batch, bundle_path_in_server=args.server_bundle_path)
        out.write(f"Triton model repository written: {Path(path)}\n")
        from wave_rt.export.triton_repo import server_flags

        flags = server_flags(args.bundle, args.platform)
        if flags:
            out.write(f"start the server with: tritonserver --model-repository {Path(path)} {' '.join(flags)}\n")
    return EXIT_OK


def _cmd_bench_latency(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from wave_rt.embed.encoder import WaveEncoder
    from wave_rt.export.bench_latency import prepare_items, run_bench_latency

    encoder = WaveEncoder.from_pretrained(None if args.model == "demo" else args.model, device=args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    items = prepare_items(encoder, args.modalities.split(","), n=max(8, *batch_sizes))
    if args.model == "demo":
        from wave_rt.model.demo import demo_checkpoint

        checkpoint = Path(demo_checkpoint())
    else:
        checkpoint = Path(args.model)
    json_path = Path(args.out)
    result = run_bench_latency(
        encoder.model, items, encoder.pad_token_id, args.backends.split(","), json_path,
        json_path.with_suffix(".png"), bundle=Path(args.bundle) if args.bundle else None,
        batch_sizes=batch_sizes, warmup=args.warmup, iters=args.iters,
        threads=args.threads, meta={"command": "wave-rt bench-latency " + args.model, "model": encoder.model_id},
        log=lambda line: out.write(line + "\n"), tokenizer_dir=checkpoint)
    for backend, reason in result["errors"].items():
        out.write(f"{backend}: not measured: {reason}\n")
    out.write(f"results: {json_path} and {json_path.with_suffix('.png')}\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from wave_rt import __version__

    ap = _Parser(prog="wave-rt", description="wave_rt: omni embeddings (text, audio, video, audio-visual) at "
                                             "archive scale")
    _global_options(ap, top=True)
    ap.add_argument("--version", action="version", version=f"wave-rt {__version__}", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        for parser in subcommand_parsers(add(sub)):
            _global_options(parser, top=False)
    return ap


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every parser nested under it (`export` -> `export bundle`, ...), depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += subcommand_parsers(child)
    return found


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def run(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Parse and run; returns the exit code (never exits the interpreter)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        err.write(f"wave-rt: error: {exc}\n")
        return EXIT_ERROR
    except SystemExit as exc:  # --help and --version print and exit 0
        return int(exc.code) if isinstance(exc.code, int) else EXIT_ERROR
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=err)
    from wave_rt.errors import WaveRTError

    try:
        return args.func(args, out)
    except KeyboardInterrupt:
        err.write("interrupted; re-run the same command to resume\n")
        return EXIT_INTERRUPTED
    # User-caused failures: bad options and inputs, paths that are missing, unreadable or unwritable, a
    # broken model directory, a missing optional dependency (WaveRTError), a device that is not there
    # (RuntimeError). One line each; -v adds the traceback for a bug report.
    except (UsageError, WaveRTError, ValueError, OSError, RuntimeError, ImportError) as exc:
        if args.verbose:
            log.exception("wave-rt %s failed", args.command)
        err.write(f"wave-rt {args.command}: error: {_one_line(exc)}\n")
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (`wave-rt`)."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
