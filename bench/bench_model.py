"""Model benchmark: wave_rt's packed embedding path vs its padded path (the previous one) vs the reference
path, on the same weights and inputs, in the same run.

- packed (ours, the default of WaveEncoder): items concatenated into one stream, varlen attention causal
  within each item, towers with one varlen call per layer, trimmed last layer, token budget = real tokens;
- padded (the previous path, still the reference/export graph): left-padded batches under B * max_len,
  dense [B, 1, T, T] mask;
- reference = what WAVE's own test script runs: batch size 1, the transformers thinker's decoder with
  output_hidden_states=True, then the last token of hidden_states[1:] into the fusion MLP; encoders through
  transformers' get_audio_features / get_video_features, BEATs merged per item as the reference code does.

Workloads are realistic: captions of about 8 to 80 BPE tokens (log-normal, median ~20), 10 s audio, 30 s
480p video at WAVE's 2 fps (smart-resized to 308x560, 30 temporal patches), 30 s audio-visual clips. All
paths get identical precomputed model inputs (preprocessing is excluded: bench_media.py measures it).
FLOPs, MFU and padding come from wave_rt.model.flops (the one FLOP model); on CUDA the bf16 ceiling is an
8192^3 GEMM measured in this run, reported beside the 989 TFLOP/s datasheet figure. On a CPU the config is
small and only the ratios mean anything.

    python bench/bench_model.py --config small            # CPU, a few minutes
    python bench/bench_model.py --config 7b               # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakMemory, device_name, row, time_it, write_result  # noqa: E402
from presets import QWEN_TOKEN_IDS, omni_7b_config_dict  # noqa: E402

from wave_rt.config import WaveConfig  # noqa: E402
from wave_rt.embed.batching import plan_batches  # noqa: E402
from wave_rt.embed.encoder import WaveEncoder  # noqa: E402
from wave_rt.embed.prepared import PreparedItem  # noqa: E402
from wave_rt.embed.processor import whisper_tokens  # noqa: E402
from wave_rt.model import flops as fl  # noqa: E402
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs  # noqa: E402
from wave_rt.model.demo_architecture import demo_thinker_config_dict  # noqa: E402
from wave_rt.model.positions import SequenceBuilder, VideoGrid  # noqa: E402
from wave_rt.model.wave_model import WaveModel  # noqa: E402

MODALITIES = ("text", "audio", "video", "av")


@dataclass
class Workload:
    texts: int
    audios: int
    audio_seconds: float
    videos: int
    avs: int
    video_seconds: float
    frame_hw: tuple[int, int]  # after smart resize, multiples of 28


WORKLOADS = {
    "small": Workload(texts=64, audios=8, audio_seconds=10.0, videos=3, avs=3, video_seconds=8.0, frame_hw=(168, 224)),
    # 480p (854x480) smart-resized to <= 176,400 pixels: 308x560; 30 s at 2 fps = 60 frames = 30 temporal patches
    "7b": Workload(texts=512, audios=64, audio_seconds=10.0, videos=8, avs=8, video_seconds=30.0, frame_hw=(308, 560)),
}


def small_config() -> WaveConfig:
    from wave_rt.model.beats import BEATsConfig

    data = demo_thinker_config_dict(QWEN_TOKEN_IDS, vocab_size=152064, hidden=256, layers=8, heads=8, kv_heads=2,
                                    audio_layers=4, vision_depth=4)
    data.update(train_classify=True, classify_type="all_layer")
    data["audio_config"]["beats_path"] = "BEATs_iter3_plus_AS2M.pt"
    data["wave_rt"] = {"recipe": "all_layer", "beats": BEATsConfig.tiny().to_dict()}
    return WaveConfig.from_dict(data)


def caption_lengths(n: int, g: torch.Generator) -> list[int]:
    """BPE lengths of captions: log-normal, median ~20 tokens, clipped to 8..80."""
    z = torch.randn(n, generator=g)
    return [int(x) for x in torch.exp(3.0 + 0.55 * z).round().clamp(8, 80)]


def _audio_segment(cfg: WaveConfig, seconds: float, g: torch.Generator) -> AudioSegmentInputs:
    samples = int(seconds * 16000)
    frames = samples // 160
    fbank = torch.randn(1 + (samples - 400) // 160, 128, generator=g) if cfg.use_beats else None
    return AudioSegmentInputs(torch.randn(128, frames, generator=g), frames, whisper_tokens(frames), fbank)


def make_items(cfg: WaveConfig, w: Workload, seed: int = 0) -> list[PreparedItem]:
    """Synthetic model inputs with real shapes: token ids, features, grids and WAVE's layouts."""
    g = torch.Generator().manual_seed(seed)
    ids = QWEN_TOKEN_IDS
    im_end = ids["<|im_end|>"]
    instr = torch.randint(0, 150000, (6,), generator=g).tolist()
    repeat = 2 if cfg.dual_audio else 1
    items: list[PreparedItem] = []
    for n in caption_lengths(w.texts, g):
        sb = SequenceBuilder()
        sb.text(torch.randint(0, 150000, (n,), generator=g).tolist() + [im_end])
        t_ids, t_pos = sb.build()
        items.append(PreparedItem("text", len(t_ids), None, ItemInputs(t_ids, t_pos, False)))
    for _ in range(w.audios):
        seg = _audio_segment(cfg, w.audio_seconds, g)
        sb = SequenceBuilder()
        sb.audio(seg.tokens * repeat, audio_id=ids["<|AUDIO|>"], bos_id=ids["<|audio_bos|>"], eos_id=ids["<|audio_eos|>"])
        sb.text(instr + [im_end])
        a_ids, a_pos = sb.build()
        items.append(PreparedItem("audio", len(a_ids), w.audio_seconds, ItemInputs(a_ids, a_pos, True, audio=[seg])))
    h, wd = w.frame_hw
    grid = VideoGrid(int(w.video_seconds * 2) // 2, h // 14, wd // 14, 1.0)  # 2 fps, temporal patch 2
    for _ in range(w.videos):
        pv = torch.randn(grid.t * grid.h * grid.w, 1176, generator=g)
        sb = SequenceBuilder()
        sb.video(grid, video_id=ids["<|VIDEO|>"], bos_id=ids["<|vision_bos|>"], eos_id=ids["<|vision_eos|>"],
                 position_id_per_seconds=25)
        sb.text(instr + [im_end])
        v_ids, v_pos = sb.build()
        items.append(PreparedItem("video", len(v_ids), w.video_seconds,
                                  ItemInputs(v_ids, v_pos, True, pixel_values=pv, grid_thw=(grid.t, grid.h, grid.w))))
    for _ in range(w.avs):
        seg = _audio_segment(cfg, w.video_seconds, g)
        pv = torch.randn(grid.t * grid.h * grid.w, 1176, generator=g)
        sb = SequenceBuilder()
        sb.audio_visual(grid, seg.tokens, audio_repeat=repeat, rule="wave" if cfg.wave_chunking else "transformers",
                        video_id=ids["<|VIDEO|>"], audio_id=ids["<|AUDIO|>"], vision_bos_id=ids["<|vision_bos|>"],
                        vision_eos_id=ids["<|vision_eos|>"], audio_bos_id=ids["<|audio_bos|>"],
                        audio_eos_id=ids["<|audio_eos|>"], position_id_per_seconds=25, seconds_per_chunk=2)
        sb.text(instr + [im_end])
        av_ids, av_pos = sb.build()
        items.append(PreparedItem("av", len(av_ids), w.video_seconds,
                                  ItemInputs(av_ids, av_pos, True, audio=[seg], pixel_values=pv,
                                             grid_thw=(grid.t, grid.h, grid.w))))
    return items


class ReferencePath:
    """WAVE's reference formulation, batch size 1, output_hidden_states=True (see module docstring)."""

    def __init__(self, model: WaveModel) -> None:
        import transformers

        self.model = model
        cfg = model.config
        with torch.device("meta"):
            hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg.hf_config)
        # transformers moved the thinker's submodules between releases (4.x/5.1x: audio_tower, visual and the
        # decoder at the top / under .model; newer: all under .model with .model.language_model): map our keys
        # onto whichever layout this installed version has.
        targets = set(hf.state_dict().keys())
        sd = {}
        for k, v in model.state_dict().items():
            for cand in (("model.language_model." + k[6:]) if k.startswith("model.") else None, "model." + k, k):
                if cand in targets:
                    sd[cand] = v
                    break
        sd["lm_head.weight"] = torch.empty(hf.lm_head.weight.shape, dtype=model.dtype, device=model.device)
        hf.load_state_dict(sd, strict=True, assign=True)  # shares our tensors: no second copy of the weights
        inner = hf.model if hasattr(hf.model, "language_model") else hf
        self.towers = inner  # owns get_audio_features / get_video_features / audio_tower / visual
        self.lm = inner.language_model if inner is hf.model else hf.model
        self.lm.rotary_emb = model.model.rotary_emb
        inner.audio_tower.positional_embedding = model.audio_tower.positional_embedding
        inner.visual.rotary_pos_emb = model.visual.rotary_pos_emb
        self.hf = hf.eval()

    @torch.inference_mode()
    def embed(self, item: PreparedItem) -> torch.Tensor:
        m, cfg = self.model, self.model.config
        dev, dt = m.device, m.dtype
        x = item.inputs
        ids = x.input_ids[None].to(dev)
        embeds = self.lm.get_input_embeddings()(ids)
        if x.audio:
            mel = torch.cat([s.mel for s in x.audio], dim=1)
            fmask = torch.ones(1, mel.shape[1], dtype=torch.long, device=dev)
            whisper = self.towers.get_audio_features(mel[None].to(dev, dt), fmask)
            whisper = getattr(whisper, "last_hidden_state", whisper)
            if cfg.use_beats:
                pooled = []
                for s in x.audio:
                    feat, _ = m.beats(s.fbank[None].to(dev, dt), padding_mask=None)
                    feat = feat[0]
                    feat = F.pad(feat, (0, 0, 0, max(0, 2 * s.tokens - feat.size(0))))[: 2 * s.tokens]
                    pooled.append(F.avg_pool1d(feat.T[None], 2, 2)[0].T)
                beats = m.beats_proj(m.beats_ln(torch.cat(pooled)))
                audio = torch.cat([whisper.unsqueeze(1), beats.unsqueeze(1)], dim=1).view(-1, whisper.size(-1))
            else:
                audio = whisper
            embeds = embeds.masked_scatter((ids == cfg.token_id("audio")).unsqueeze(-1), audio.to(embeds.dtype))
        if x.pixel_values is not None:
            grid = torch.tensor([x.grid_thw], device=dev)
            video = self.towers.get_video_features(x.pixel_values.to(dev, dt), grid)
            video = getattr(video, "pooler_output", video)
            video = torch.cat(list(video)) if isinstance(video, (list, tuple)) else video
            embeds = embeds.masked_scatter((ids == cfg.token_id("video")).unsqueeze(-1), video.to(embeds.dtype))
        out = self.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                      position_ids=x.position_ids[:, None].to(dev), output_hidden_states=True)
        rows = torch.stack([h[:, -1] for h in out.hidden_states[1:]], dim=1)
        if x.use_head:
            return F.normalize(m.classify_linear(rows.reshape(1, -1)).float(), dim=-1)
        return F.normalize(rows[:, -1].float(), dim=-1)


def run_ours(encoder: WaveEncoder, items: list[PreparedItem], budget: int) -> torch.Tensor:
    """encode()'s model loop on prepared items: batches under the budget, the next batch collated and copied
    while the current one computes (public stage/launch of WaveEncoder)."""
    out = torch.empty(len(items), encoder.dim)
    groups = plan_batches([p.num_tokens for p in items], budget, None, packed=encoder.packed)
    staged = encoder.stage([items[i] for i in groups[0]]) if groups else None
    for j, group in enumerate(groups):
        result = encoder.launch(staged)
        if j + 1 < len(groups):
            staged = encoder.stage([items[i] for i in groups[j + 1]])
        out[group] = result.cpu()
    return out


def processed_tokens(items: list[PreparedItem], budget: int, packed: bool) -> int:
    """Tokens the forward computes: real tokens when packed, B * max_len per batch when padded."""
    lengths = [p.num_tokens for p in items]
    if packed:
        return sum(lengths)
    return sum(len(gr) * max(lengths[i] for i in gr) for gr in plan_batches(lengths, budget, None, packed=False))


def run_ours_bs1(encoder: WaveEncoder, items: list[PreparedItem]) -> torch.Tensor:
    return torch.cat([encoder.embed_prepared([p]) for p in items])


def run_reference(ref: ReferencePath, items: list[PreparedItem]) -> torch.Tensor:
    return torch.cat([ref.embed(p).cpu() for p in items])


def workload_flops(items: list[PreparedItem], model: WaveModel) -> dict[str, float]:
    """The one FLOP model (wave_rt.model.flops) on real tokens: decoder (trimmed last layer, what the packed
    path computes; the untrimmed prefill figure beside it) and every encoder."""
    shape = fl.DecoderShape.of(model.model)
    lengths = [p.num_tokens for p in items]
    segs = [s for p in items for s in p.inputs.audio]
    grids = [p.inputs.grid_thw for p in items if p.inputs.grid_thw is not None]
    out = {"decoder": fl.decoder_flops(lengths, shape, last_layer_trimmed=True),
           "decoder_untrimmed": fl.decoder_flops(lengths, shape),
           "audio_tower": fl.whisper_flops([s.mel_len for s in segs], model.audio_tower) if segs else 0.0,
           "vision_tower": fl.vision_flops(grids, model.visual) if grids else 0.0,
           "beats": 0.0}
    if model.config.use_beats and segs:
        patch = int(model.beats.cfg.input_patch_size)
        out["beats"] = fl.beats_flops([(s.fbank.shape[0] // patch) * (128 // patch) for s in segs], model.beats)
    out["total"] = out["decoder"] + out["audio_tower"] + out["vision_tower"] + out["beats"]
    return out


def compiled_decoder_layers() -> None:
    """torch.compile the packed decoder layer (dynamic shapes: every batch has another token count)."""
    from wave_rt.model import packed_decoder

    packed_decoder.packed_layer = torch.compile(packed_decoder.packed_layer, dynamic=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "7b"], default="small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--modalities", default=",".join(MODALITIES),
                    help="comma-separated subset of text,audio,video,av (a subset writes model_<config>_<device>_<subset>.json)")
    ap.add_argument("--no-reference", action="store_true", help="skip the bs=1 transformers reference rows")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the packed path with torch.compile'd decoder layers (extra row)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path (default under bench/results/)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output path, run nothing")
    args = ap.parse_args(argv)
    wanted = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if not wanted or set(wanted) - set(MODALITIES):
        ap.error(f"--modalities must name some of {', '.join(MODALITIES)}; got {args.modalities!r}")
    subset = "" if set(wanted) == set(MODALITIES) else "_" + "_".join(wanted)
    if args.dry_run:
        from harness import RESULTS, dry_run_report

        out = args.out or RESULTS / f"model_{args.config}_cuda{subset}.json"
        print(f"dry-run bench_model.py: would run config={args.config} modalities={wanted} "
              f"reference={not args.no_reference} compile={args.compile} -> {out}")
        raise SystemExit(dry_run_report("bench_model.py", [out]))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = small_config() if args.config == "small" else WaveConfig.from_dict(omni_7b_config_dict())
    model = WaveModel.build(cfg, device=device, dtype=dtype, init="random", seed=0)
    packed = WaveEncoder(model, None, model_id=f"random-{args.config}", packed=True)
    padded = WaveEncoder(model, None, model_id=f"random-{args.config}", packed=False)
    ref = None if args.no_reference else ReferencePath(model)
    items = make_items(cfg, WORKLOADS[args.config])
    budget = args.max_batch_tokens or packed.default_max_batch_tokens
    peak_measured = fl.measure_gemm_tflops(device)
    peak_sheet = fl.datasheet_peak(device_name()) if device.type == "cuda" else None
    from wave_rt.model.varlen import backend_for

    extra = {"config": args.config, "dtype": str(dtype), "max_batch_tokens": budget,
             "gemm_8192_bf16_tflops_measured": peak_measured, "datasheet_bf16_tflops": peak_sheet,
             "attention_backend": backend_for(device, dtype), "partial": True}
    command = "python bench/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(rows: list, partial: bool) -> Path:
        extra["partial"] = partial
        if args.out is None:
            return write_result("model", rows, command, suffix=f"{args.config}_{device.type}{subset}", extra=extra)
        tmp = write_result("model", rows, command, suffix=f"{args.config}_{device.type}{subset}_tmp", extra=extra)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(tmp.read_text())
        tmp.unlink()
        return args.out

    rows: list = []
    by_mod: dict[str, list[PreparedItem]] = {}
    for p in items:
        if p.modality in wanted:
            by_mod.setdefault(p.modality, []).append(p)
    path = None
    for modality in [m for m in MODALITIES if m in by_mod]:
        group = by_mod[modality]
        n = len(group)
        real = sum(p.num_tokens for p in group)
        f = workload_flops(group, model)
        e_packed = run_ours(packed, group, budget)
        e_padded = run_ours(padded, group, budget)
        agree_padded = float((e_packed * e_padded).sum(-1).min())
        t_packed = time_it(lambda g=group: run_ours(packed, g, budget), warmup=1, repeats=args.repeats)["median"]
        t_padded = time_it(lambda g=group: run_ours(padded, g, budget), warmup=1, repeats=args.repeats)["median"]

        def perf(t: float, processed: int, f: dict = f, real: int = real) -> dict:
            tflops = f["total"] / t / 1e12
            llm = f["decoder"] / t / 1e12
            return {"seconds": t, "processed_tokens": processed, "padding_fraction": fl.padding_fraction(real, processed),
                    "tflops_achieved": tflops, "mfu_measured_ceiling": fl.mfu(f["total"], t, peak_measured),
                    "mfu_datasheet": fl.mfu(f["total"], t, peak_sheet), "llm_tflops_achieved": llm,
                    "llm_mfu_measured_ceiling": fl.mfu(f["decoder"], t, peak_measured)}

        p_packed = perf(t_packed, processed_tokens(group, budget, True))
        p_padded = perf(t_padded, processed_tokens(group, budget, False))
        rows.append(row(f"{modality} x{n}: packed vs padded (previous path), items/s", "padded (left-padded, dense mask)",
                        n / t_padded, n / t_packed, "items/s", ceiling_value=peak_measured, real_tokens=real,
                        flops=f, packed=p_packed, padded=p_padded, min_cosine_packed_vs_padded=agree_padded,
                        tflops_achieved=p_packed["tflops_achieved"], mfu=p_packed["mfu_measured_ceiling"],
                        mfu_datasheet=p_packed["mfu_datasheet"]))
        line = (f"{modality:6s} packed {n / t_packed:9.2f} it/s  padded {n / t_padded:9.2f} it/s  "
                f"x{t_padded / t_packed:5.2f}  padding(padded) {p_padded['padding_fraction']:.2f}")
        if peak_measured:
            line += f"  MFU packed {p_packed['mfu_measured_ceiling']:.1%} padded {p_padded['mfu_measured_ceiling']:.1%}"
        if args.compile:
            compiled_decoder_layers()
            run_ours(packed, group, budget)
            t_comp = time_it(lambda g=group: run_ours(packed, g, budget), warmup=1, repeats=args.repeats)["median"]
            from wave_rt.model import packed_decoder

            packed_decoder.packed_layer = packed_decoder.packed_layer._torchdynamo_orig_callable
            rows.append(row(f"{modality} x{n}: packed + torch.compile'd decoder layers vs packed eager, items/s",
                            "packed eager", n / t_packed, n / t_comp, "items/s", compiled=perf(t_comp, real)))
            line += f"  compiled x{t_packed / t_comp:5.2f}"
        if ref is not None:
            theirs = run_reference(ref, group)
            agree = float((e_packed * theirs).sum(-1).min())
            t_ref = time_it(lambda g=group: run_reference(ref, g), warmup=1, repeats=args.repeats)["median"]
            with PeakMemory() as m_ours:
                run_ours(packed, group, budget)
            with PeakMemory() as m_ref:
                run_reference(ref, group)
            rows.append(row(f"{modality} x{n}: packed vs reference bs=1, items/s", "reference bs=1 output_hidden_states",
                            n / t_ref, n / t_packed, "items/s", min_cosine_vs_reference=agree))
            rows.append(row(f"{modality} x{n}: peak memory above weights, packed under the token budget",
                            "reference bs=1 output_hidden_states", m_ref.peak_bytes / 2**20,
                            m_ours.peak_bytes / 2**20, "MiB", higher_is_better=False))
            line += f"  ref {n / t_ref:8.2f} it/s  cos>={agree:.5f}"
        print(line + f"  cos(packed, padded)>={agree_padded:.5f}", flush=True)
        path = save(rows, partial=True)
    path = save(rows, partial=False)
    print(f"wrote {path}")
    print(json.dumps({"attention_backend": extra["attention_backend"], "gemm_tflops": peak_measured}))


if __name__ == "__main__":
    main()
