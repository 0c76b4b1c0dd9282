"""Model benchmark: wave_rt's embedding path vs the reference path on the same weights and inputs.

Reference path = what WAVE's own test script runs: batch size 1, the transformers thinker's decoder
with output_hidden_states=True (every layer's full hidden states kept), then the last token of
hidden_states[1:] into the fusion MLP; encoders through transformers' get_audio_features /
get_video_features, BEATs merged per item as the reference code does. Ours = WaveEncoder.embed_prepared
over length-sorted batches under the token budget, last-token capture, no LM head.

Both sides get identical precomputed model inputs (preprocessing is excluded: bench_media.py measures
it), and every reported ratio comes from the same run. On a CPU the config is small (the numbers
are ratios, not absolute speeds); on a GPU use --config 7b: the Qwen2.5-Omni-7B thinker + BEATs +
fusion MLP with random bf16 weights, on text, 10 s audio and 30 s video.

    python bench/bench_model.py --config small            # CPU, a few minutes
    python bench/bench_model.py --config 7b               # GPU
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakMemory, row, time_it, write_result  # noqa: E402
from presets import QWEN_TOKEN_IDS, omni_7b_config_dict  # noqa: E402

from wave_rt.config import WaveConfig  # noqa: E402
from wave_rt.embed.batching import plan_batches  # noqa: E402
from wave_rt.embed.encoder import WaveEncoder  # noqa: E402
from wave_rt.embed.prepared import PreparedItem  # noqa: E402
from wave_rt.embed.processor import whisper_tokens  # noqa: E402
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs  # noqa: E402
from wave_rt.model.positions import SequenceBuilder, VideoGrid  # noqa: E402
from wave_rt.model.tiny import tiny_thinker_config_dict  # noqa: E402
from wave_rt.model.wave_model import WaveModel  # noqa: E402


@dataclass
class Workload:
    texts: int
    audios: int
    audio_seconds: float
    videos: int
    video_seconds: float
    frame_hw: tuple[int, int]  # after smart resize, multiples of 28


WORKLOADS = {
    "small": Workload(texts=64, audios=8, audio_seconds=10.0, videos=4, video_seconds=8.0, frame_hw=(168, 224)),
    "7b": Workload(texts=512, audios=64, audio_seconds=10.0, videos=16, video_seconds=30.0, frame_hw=(308, 560)),
}


def small_config() -> WaveConfig:
    from wave_rt.model.beats import BEATsConfig

    data = tiny_thinker_config_dict(QWEN_TOKEN_IDS, vocab_size=152064, hidden=256, layers=8, heads=8, kv_heads=2,
                                    audio_layers=4, vision_depth=4)
    data.update(train_classify=True, classify_type="all_layer")
    data["audio_config"]["beats_path"] = "BEATs_iter3_plus_AS2M.pt"
    data["wave_rt"] = {"recipe": "all_layer", "beats": BEATsConfig.tiny().to_dict()}
    return WaveConfig.from_dict(data)


def make_items(cfg: WaveConfig, w: Workload, seed: int = 0) -> list[PreparedItem]:
    """Synthetic model inputs with real shapes: token ids, features, grids and WAVE's layouts."""
    g = torch.Generator().manual_seed(seed)
    ids = QWEN_TOKEN_IDS
    im_end = ids["<|im_end|>"]
    instr = torch.randint(0, 150000, (6,), generator=g).tolist()
    repeat = 2 if cfg.dual_audio else 1
    items: list[PreparedItem] = []
    for _ in range(w.texts):
        n = int(torch.randint(8, 64, (1,), generator=g))
        sb = SequenceBuilder()
        sb.text(torch.randint(0, 150000, (n,), generator=g).tolist() + [im_end])
        t_ids, t_pos = sb.build()
        items.append(PreparedItem("text", len(t_ids), None, ItemInputs(t_ids, t_pos, False)))
    samples = int(w.audio_seconds * 16000)
    frames = samples // 160
    n = whisper_tokens(frames)
    for _ in range(w.audios):
        seg = AudioSegmentInputs(torch.randn(128, frames, generator=g), frames, n,
                                 torch.randn(1 + (samples - 400) // 160, 128, generator=g) if cfg.use_beats else None)
        sb = SequenceBuilder()
        sb.audio(n * repeat, audio_id=ids["<|AUDIO|>"], bos_id=ids["<|audio_bos|>"], eos_id=ids["<|audio_eos|>"])
        sb.text(instr + [im_end])
        a_ids, a_pos = sb.build()
        items.append(PreparedItem("audio", len(a_ids), w.audio_seconds, ItemInputs(a_ids, a_pos, True, audio=[seg])))
    h, wd = w.frame_hw
    grid = VideoGrid(int(w.video_seconds * 2) // 2, h // 14, wd // 14, 1.0)
    for _ in range(w.videos):
        pv = torch.randn(grid.t * grid.h * grid.w, 1176, generator=g)
        sb = SequenceBuilder()
        sb.video(grid, video_id=ids["<|VIDEO|>"], bos_id=ids["<|vision_bos|>"], eos_id=ids["<|vision_eos|>"],
                 position_id_per_seconds=25)
        sb.text(instr + [im_end])
        v_ids, v_pos = sb.build()
        items.append(PreparedItem("video", len(v_ids), w.video_seconds,
                                  ItemInputs(v_ids, v_pos, True, pixel_values=pv, grid_thw=(grid.t, grid.h, grid.w))))
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
    out = torch.empty(len(items), encoder.dim)
    for group in plan_batches([p.num_tokens for p in items], budget, None):
        out[group] = encoder.embed_prepared([items[i] for i in group])
    return out


def run_ours_bs1(encoder: WaveEncoder, items: list[PreparedItem]) -> torch.Tensor:
    return torch.cat([encoder.embed_prepared([p]) for p in items])


def run_reference(ref: ReferencePath, items: list[PreparedItem]) -> torch.Tensor:
    return torch.cat([ref.embed(p).cpu() for p in items])


def llm_flops(items: list[PreparedItem], cfg: WaveConfig, n_params_llm: int) -> float:
    """DESIGN.md section 7: 2 * P * T + 4 * L * T^2 * d / 2 per sequence, real tokens only."""
    L, d = cfg.num_layers, cfg.hidden_size
    return sum(2 * n_params_llm * p.num_tokens + 2 * L * p.num_tokens ** 2 * d for p in items)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "7b"], default="small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--modalities", default="text,audio,video",
                    help="comma-separated subset of text,audio,video (a subset writes model_<config>_<device>_<subset>.json)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and output path, run nothing")
    args = ap.parse_args(argv)
    wanted = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if not wanted or set(wanted) - {"text", "audio", "video"}:
        ap.error(f"--modalities must name some of text, audio, video; got {args.modalities!r}")
    if args.dry_run:
        from harness import RESULTS, dry_run_report

        subset = "" if set(wanted) == {"text", "audio", "video"} else "_" + "_".join(wanted)
        raise SystemExit(dry_run_report("bench_model.py", [RESULTS / f"model_{args.config}_cuda{subset}.json"]))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = small_config() if args.config == "small" else WaveConfig.from_dict(omni_7b_config_dict())
    model = WaveModel.build(cfg, device=device, dtype=dtype, init="random", seed=0)
    encoder = WaveEncoder(model, None, model_id=f"random-{args.config}")
    ref = ReferencePath(model)
    work = WORKLOADS[args.config]
    items = make_items(cfg, work)
    budget = args.max_batch_tokens or encoder.default_max_batch_tokens
    n_llm = sum(p.numel() for p in model.model.parameters())

    rows = []
    by_mod: dict[str, list[PreparedItem]] = {}
    for p in items:
        if p.modality in wanted:
            by_mod.setdefault(p.modality, []).append(p)
    subset = "" if set(wanted) == {"text", "audio", "video"} else "_" + "_".join(wanted)
    for modality, group in by_mod.items():
        ours = run_ours(encoder, group, budget)
        theirs = run_reference(ref, group)
        agree = float((ours * theirs).sum(-1).min())  # cosine of the normalised embeddings
        t_ours = time_it(lambda g=group: run_ours(encoder, g, budget), warmup=1, repeats=args.repeats)
        t_ref = time_it(lambda g=group: run_reference(ref, g), warmup=1, repeats=args.repeats)
        with PeakMemory() as m_ours:
            run_ours(encoder, group, budget)
        with PeakMemory() as m_ref:
            run_reference(ref, group)
        # The batched peak above trades memory for throughput; at batch size 1, like the reference, the
        # difference is what the reference wastes (full hidden states of every layer, LM-head-ready model).
        with PeakMemory() as m_ours_bs1:
            run_ours_bs1(encoder, group)
        ips_ours, ips_ref = len(group) / t_ours["median"], len(group) / t_ref["median"]
        flops = llm_flops(group, cfg, n_llm)
        from harness import ceiling

        peak = ceiling("bf16_TFLOPs") if device.type == "cuda" else None
        mfu = (flops / t_ours["median"] / 1e12) if device.type == "cuda" else None
        rows.append(row(f"{modality} x{len(group)} items/s", "reference bs=1 output_hidden_states", ips_ref, ips_ours,
                        "items/s", min_cosine_vs_reference=agree, tokens=sum(p.num_tokens for p in group),
                        llm_tflops_achieved=mfu, ceiling_tflops=peak,
                        mfu=(mfu / peak) if (mfu and peak) else None))
        rows.append(row(f"{modality} x{len(group)} peak memory above weights, ours batched under the token budget",
                        "reference bs=1 output_hidden_states",
                        m_ref.peak_bytes / 2**20, m_ours.peak_bytes / 2**20, "MiB", higher_is_better=False))
        rows.append(row(f"{modality} x{len(group)} peak memory above weights, ours at batch size 1",
                        "reference bs=1 output_hidden_states",
                        m_ref.peak_bytes / 2**20, m_ours_bs1.peak_bytes / 2**20, "MiB", higher_is_better=False))
        print(f"{modality:6s} ours {ips_ours:8.2f} it/s  ref {ips_ref:8.2f} it/s  x{ips_ours / ips_ref:5.2f}  "
              f"mem ours {m_ours.peak_bytes / 2**20:8.1f} MiB (bs=1 {m_ours_bs1.peak_bytes / 2**20:8.1f}) ref {m_ref.peak_bytes / 2**20:8.1f} MiB  cos>={agree:.5f}")
        path = write_result("model", rows, "python bench/bench_model.py " + " ".join(argv or sys.argv[1:]),
                            suffix=f"{args.config}_{device.type}{subset}",
                            extra={"config": args.config, "dtype": str(dtype), "max_batch_tokens": budget})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
