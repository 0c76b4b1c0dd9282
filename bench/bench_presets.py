"""Preset benchmark: wave_rt's encode path vs each omni embedder's published inference path, same weights and inputs.

Reference path per preset = what the model's own code runs: batch size 1, transformers with
output_hidden_states=True (every layer's full hidden states kept), then the preset's pooling (LCO / e5-omni:
hidden_states[-1][:, -1]; Omni-Embed-Nemotron: the language model under a 4-D all-visible mask and the mean of
hidden_states[-1]; ALM2Vec: transformers' Qwen2Model, state at the appended EOS, projection; MiDashengLM's audio
encoder and projector are our modules on both sides, as no reference implementation runs without torchaudio).
Ours = WaveEncoder.embed_prepared over batches planned as encode() plans them (the packed hot path, every preset:
the token budget counts real tokens). A second row per preset and modality times the same encoder with packed=False
(the left-padded forward, budget = batch x longest) against the packed one: what packing buys per recipe, mean +
bidirectional included. Preprocessing (mel, prompts) is done once, outside the timings. Ratios come from the same
run; on a CPU the models are small and only the ratios mean anything.

    python bench/bench_presets.py --config small      # CPU, a few minutes
    python bench/bench_presets.py --config 7b         # GPU: 7B thinkers / MiDashengLM-7B widths, bf16, random weights
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the tests' tiny MiDashengLM config (a test helper: the package has no MiDashengLM demo)
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import RESULTS, dry_run_report, row, time_it, write_result  # noqa: E402
from tiny_checkpoints import tiny_midashenglm_config_dict  # noqa: E402

from wave_rt import Audio  # noqa: E402
from wave_rt.config import WaveConfig  # noqa: E402
from wave_rt.embed.batching import plan_batches  # noqa: E402
from wave_rt.embed.encoder import WaveEncoder  # noqa: E402
from wave_rt.embed.processor import WaveProcessor, load_tokenizer  # noqa: E402
from wave_rt.model.demo_architecture import demo_thinker_config_dict, write_demo_tokenizer  # noqa: E402
from wave_rt.model.embedder_presets import get_preset  # noqa: E402
from wave_rt.model.wave_model import WaveModel  # noqa: E402

PRESETS = ("lco-omni", "e5-omni", "omni-embed-nemotron", "alm2vec")
WORKLOADS = {"small": dict(texts=16, audios=3, seconds=4.0), "7b": dict(texts=512, audios=64, seconds=10.0)}


def _config(preset: str, size: str, ids: dict[str, int]) -> WaveConfig:
    if get_preset(preset).backbone == "midashenglm":
        data = tiny_midashenglm_config_dict(ids, vocab_size=152064, hidden=256, layers=8)
        if size == "7b":
            from wave_rt.model.dasheng import DashengConfig

            data["audio_encoder_config"] = DashengConfig().to_dict()  # Dasheng 0.6B widths
            data["text_config"].update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=151936)
        else:
            data["audio_encoder_config"].update(embed_dim=128, depth=4, num_heads=4, target_length=1008)
        data["wave_rt"] = {"projection_dim": data["text_config"]["hidden_size"]}
    elif size == "7b":
        from presets import omni_7b_config_dict

        data = omni_7b_config_dict(recipe="last_token", use_beats=False)
        for key, tok in (("audio_token_index", "<|AUDIO|>"), ("image_token_index", "<|IMAGE|>"),
                         ("video_token_index", "<|VIDEO|>"), ("audio_start_token_id", "<|audio_bos|>"),
                         ("audio_end_token_id", "<|audio_eos|>"), ("vision_start_token_id", "<|vision_bos|>"),
                         ("vision_end_token_id", "<|vision_eos|>")):
            data[key] = ids[tok]  # the tiny tokenizer's ids (no Qwen tokenizer is downloadable here)
        data["text_config"]["pad_token_id"] = ids["<|endoftext|>"]
    else:
        data = demo_thinker_config_dict(ids, vocab_size=152064, hidden=256, layers=8, heads=8, kv_heads=2,
                                        audio_layers=4, vision_depth=2)
    ours = dict(data.pop("wave_rt", None) or {})
    ours.pop("recipe", None)
    ours["preset"] = preset
    cfg = WaveConfig.from_dict({**data, "wave_rt": ours}, recipe=get_preset(preset).recipe_name)
    cfg.recipe = get_preset(preset).recipe
    return cfg


class Reference:
    """The preset's published path at batch size 1 with output_hidden_states=True, sharing our weights."""

    def __init__(self, model: WaveModel, preset: str) -> None:
        self.model, self.preset = model, preset
        if model.config.backbone == "midashenglm":
            import transformers

            with torch.device("meta"):
                qwen = transformers.Qwen2Model(model.config.hf_config.text_config)
            qwen.load_state_dict({k[6:]: v for k, v in model.state_dict().items() if k.startswith("model.")},
                                 strict=True, assign=True)
            qwen.rotary_emb = model.model.rotary_emb
            self.qwen = qwen.eval()
        else:
            from bench_model import ReferencePath

            self.path = ReferencePath(model)

    @torch.inference_mode()
    def embed(self, item) -> torch.Tensor:
        m, cfg, x = self.model, self.model.config, item.inputs
        dev, dt = m.device, m.dtype
        ids = x.input_ids[None].to(dev)
        if cfg.backbone == "midashenglm":
            embeds = self.qwen.embed_tokens(ids)
            if x.audio:
                s = x.audio[0]
                audio = m.audio_projector(m.audio_encoder(s.mel[None].to(dev, dt)))[0, : s.tokens]
                embeds = embeds.masked_scatter((ids == cfg.token_id("audio")).unsqueeze(-1), audio.to(embeds.dtype))
            out = self.qwen(inputs_embeds=embeds, output_hidden_states=True)
            return F.normalize(m.eos_proj(out.hidden_states[-1][:, -1]).float(), dim=-1)
        p = self.path
        embeds = p.lm.get_input_embeddings()(ids)
        if x.audio:
            mel = torch.cat([s.mel for s in x.audio], dim=1)
            fmask = torch.ones(1, mel.shape[1], dtype=torch.long, device=dev)
            audio = p.towers.get_audio_features(mel[None].to(dev, dt), fmask)
            audio = getattr(audio, "last_hidden_state", audio)
            embeds = embeds.masked_scatter((ids == cfg.token_id("audio")).unsqueeze(-1), audio.to(embeds.dtype))
        pos = x.position_ids[:, None].to(dev)
        if cfg.recipe.attention == "bidirectional":
            T = ids.shape[1]
            out = p.lm(inputs_embeds=embeds, attention_mask=torch.ones(1, 1, T, T, dtype=torch.bool, device=dev),
                       position_ids=pos, output_hidden_states=True)
        else:
            out = p.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), position_ids=pos,
                       output_hidden_states=True)
        last = out.hidden_states[-1]
        pooled = last.mean(dim=1) if cfg.recipe.pooling == "mean" else last[:, -1]
        return F.normalize(pooled.float(), dim=-1)


def _runner(encoder: WaveEncoder, prepared: list):
    """Embed `prepared` as encode() would: batches planned for this encoder's layout under its token budget."""
    budget = encoder.default_max_batch_tokens
    groups = plan_batches([p.num_tokens for p in prepared], budget, None, packed=encoder.packed)

    def run() -> torch.Tensor:
        out = torch.empty(len(prepared), encoder.dim)
        for group in groups:
            out[group] = encoder.embed_prepared([prepared[i] for i in group])
        return out

    return run


def _items(processor: WaveProcessor, w: dict, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    words = "sound dog rain engine bird music voice crowd wind street piano siren".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(4, 24)))) for _ in range(w["texts"])]
    n = int(w["seconds"] * 16000)
    audios = [Audio((0.3 * rng.standard_normal(n)).astype(np.float32), sample_rate=16000) for _ in range(w["audios"])]
    return {"text": [processor.prepare(t) for t in texts], "audio": [processor.prepare(a) for a in audios]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(WORKLOADS), default="small")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        get_preset(p)
    if args.dry_run:
        print(f"dry run: presets {presets}, workload {WORKLOADS[args.config]}")
        return dry_run_report("bench_presets", [RESULTS / "presets_x.json"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    command = "python bench/bench_presets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    suffix = f"{args.config}_{'cuda' if cuda else 'cpu'}"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = write_demo_tokenizer(tmp)
        tokenizer = load_tokenizer(tmp)
        for preset in presets:
            cfg = _config(preset, args.config, ids)
            model = WaveModel.build(cfg, device=device, dtype=dtype, seed=0)
            encoder = WaveEncoder(model, WaveProcessor(cfg, tokenizer), model_id=preset)
            padded_encoder = WaveEncoder(model, encoder.processor, model_id=preset, packed=False)
            if not encoder.packed:
                raise RuntimeError(f"{preset}: the encoder did not take the packed path")
            ref = Reference(model, preset)
            items = _items(encoder.processor, WORKLOADS[args.config])
            for modality, prepared in items.items():
                if modality not in get_preset(preset).modalities:
                    continue
                ours = _runner(encoder, prepared)
                padded = _runner(padded_encoder, prepared)

                def reference(prepared=prepared, ref=ref):
                    return torch.cat([ref.embed(p).cpu() for p in prepared])

                a, b, c = ours(), reference(), padded()
                agree = float(F.cosine_similarity(a, b, dim=-1).min())
                agree_padded = float(F.cosine_similarity(a, c, dim=-1).min())
                # the agreement runs above were the warm-up
                t_ours = time_it(ours, warmup=0, repeats=args.repeats)["median"]
                t_ref = time_it(reference, warmup=0, repeats=args.repeats)["median"]
                t_pad = time_it(padded, warmup=0, repeats=args.repeats)["median"]
                n = len(prepared)
                tokens = sum(p.num_tokens for p in prepared)
                rows.append(row(f"{preset}/{modality} x{n}", "reference bs1 output_hidden_states=True",
                                n / t_ref, n / t_ours, "items/s", min_cosine_vs_reference=agree, tokens=tokens,
                                packed=encoder.packed))
                print(rows[-1], flush=True)
                rows.append(row(f"{preset}/{modality} x{n} packed", "padded forward (packed=False), same encoder",
                                n / t_pad, n / t_ours, "items/s", min_cosine_vs_padded=agree_padded, tokens=tokens))
                print(rows[-1], flush=True)
                write_result("presets", rows, command, suffix=suffix, extra={"partial": True})
            del model, encoder, padded_encoder, ref
    path = write_result("presets", rows, command, suffix=suffix, extra={"partial": False})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
