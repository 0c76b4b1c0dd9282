"""BEATs numerics: our encoder against a float64 re-statement of the reference maths (microsoft/unilm
beats/BEATs.py + backbone.py, extract_features(feature_only=True)), half precision against the plain
path in the same dtype, batch invariance with poisoned padding, query blocking, export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wave_rt.errors import InputError
from wave_rt.model.beats import BEATsConfig, BEATsEncoder

# ---------------------------------------------------------------------- float64 re-statement of the reference


def _bucket(offset: int, num_buckets: int, max_distance: int) -> int:
    half = num_buckets // 2
    out = half if offset > 0 else 0
    d = abs(offset)
    exact = half // 2
    if d < exact:
        return out + d
    return out + min(half - 1, exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact)))


def reference_features(state: dict[str, torch.Tensor], cfg: BEATsConfig, fbank: torch.Tensor,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One unpadded item fbank [T, F] -> tokens [N, C], as the reference computes them (no batching,
    no mask, eval mode), in `dtype`: the softmax and everything else in that dtype, the FFN GELU in
    float32 for half dtypes as the reference does."""
    w = {k: v.to(dtype) for k, v in state.items()}
    p, c, h = cfg.input_patch_size, cfg.encoder_embed_dim, cfg.encoder_attention_heads
    x = F.conv2d(fbank.to(dtype)[None, None], w["patch_embedding.weight"], w.get("patch_embedding.bias"), stride=p)
    x = x.reshape(x.shape[1], -1).T  # [N, E]: row t*(F/p) + f
    x = F.layer_norm(x, (cfg.embed_dim,), w["layer_norm.weight"], w["layer_norm.bias"])
    if "post_extract_proj.weight" in w:
        x = x @ w["post_extract_proj.weight"].T + w["post_extract_proj.bias"]
    n = x.shape[0]

    v, g = w["encoder.pos_conv.0.weight_v"], w["encoder.pos_conv.0.weight_g"]
    kernel = v * g / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    conv = F.conv1d(x.T[None], kernel, w["encoder.pos_conv.0.bias"], padding=cfg.conv_pos // 2,
                    groups=cfg.conv_pos_groups)[0]
    if cfg.conv_pos % 2 == 0:
        conv = conv[:, :-1]
    x = x + F.gelu(conv).T
    if not cfg.layer_norm_first:
        x = F.layer_norm(x, (c,), w["encoder.layer_norm.weight"], w["encoder.layer_norm.bias"])

    bias = None
    if cfg.relative_position_embedding:
        table = w["encoder.layers.0.self_attn.relative_attention_bias.weight"]  # layer 0's, shared by all
        buckets = torch.tensor([[_bucket(j - i, cfg.num_buckets, cfg.max_distance) for j in range(n)] for i in range(n)])
        bias = table[buckets].permute(2, 0, 1)  # [H, N(query), N(key)]

    def act(t):
        return F.gelu(t.float()).to(dtype) if dtype in (torch.float16, torch.bfloat16) else F.gelu(t)

    alpha = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0
    d = c // h
    for i in range(cfg.encoder_layers):
        pre = f"encoder.layers.{i}."

        def lin(t, name, pre=pre):
            return t @ w[pre + name + ".weight"].T + w[pre + name + ".bias"]

        def ln(t, name, pre=pre):
            return F.layer_norm(t, (c,), w[pre + name + ".weight"], w[pre + name + ".bias"])

        def attention(t, pre=pre):
            q = lin(t, "self_attn.q_proj").view(n, h, d).transpose(0, 1)
            k = lin(t, "self_attn.k_proj").view(n, h, d).transpose(0, 1)
            val = lin(t, "self_attn.v_proj").view(n, h, d).transpose(0, 1)
            logits = (q * d**-0.5) @ k.transpose(1, 2)
            if bias is not None:
                gate = torch.ones(h, n, 1, dtype=dtype)
                if cfg.gru_rel_pos:
                    z = q @ w[pre + "self_attn.grep_linear.weight"].T + w[pre + "self_attn.grep_linear.bias"]
                    a = torch.sigmoid(z[..., :4].sum(-1, keepdim=True))
                    b = torch.sigmoid(z[..., 4:].sum(-1, keepdim=True))
                    gate = a * (b * w[pre + "self_attn.grep_a"].view(h, 1, 1) - 1) + 2
                logits = logits + gate * bias
            out = (torch.softmax(logits, dim=-1) @ val).transpose(0, 1).reshape(n, c)
            return lin(out, "self_attn.out_proj")

        def ffn(t):
            return lin(act(lin(t, "fc1")), "fc2")

        if cfg.layer_norm_first:
            x = x + attention(ln(x, "self_attn_layer_norm"))
            x = x + ffn(ln(x, "final_layer_norm"))
        else:
            x = ln(alpha * x + attention(x), "self_attn_layer_norm")
            x = ln(alpha * x + ffn(x), "final_layer_norm")
    if cfg.layer_norm_first:
        x = F.layer_norm(x, (c,), w["encoder.layer_norm.weight"], w["encoder.layer_norm.bias"])
    return x


# ---------------------------------------------------------------------- fixtures


def random_encoder(cfg: BEATsConfig, seed: int) -> BEATsEncoder:
    """Our encoder with every parameter random (norm affines, gates and magnitudes away from 1/0) and the
    relative tables tied, as in the released checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    model = BEATsEncoder(cfg).eval()
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("weight_g"):
            tensor.mul_(1 + 0.5 * torch.rand(tensor.shape, generator=gen))
        elif tensor.dim() == 1 or name.endswith("grep_a"):
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=gen))
    if cfg.relative_position_embedding:
        table = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
        for i in range(cfg.encoder_layers):
            state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    model.load_state_dict(state, strict=True)
    return model


CONFIGS = {
    "tiny": BEATsConfig.tiny(),
    "pre-ln": BEATsConfig.from_dict({**BEATsConfig.tiny().to_dict(), "layer_norm_first": True, "deep_norm": False}),
    "ungated": BEATsConfig.from_dict({**BEATsConfig.tiny().to_dict(), "gru_rel_pos": False}),
    "no-relpos": BEATsConfig.from_dict({**BEATsConfig.tiny().to_dict(), "relative_position_embedding": False,
                                        "gru_rel_pos": False, "embed_dim": 32}),
    # Full width and the released bucket settings, one layer: 12 heads of 64, 320 buckets / 800.
    "wide-1layer": BEATsConfig(encoder_layers=1),
}


@pytest.mark.parametrize("name, frames", [("tiny", 203), ("pre-ln", 150), ("ungated", 203), ("no-relpos", 99),
                                          ("wide-1layer", 1100)])
def test_matches_float64_reference(name, frames):
    cfg = CONFIGS[name]
    model = random_encoder(cfg, seed=1)
    fbank = torch.randn(2, frames, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours32, mask = model(fbank)
        ours64, _ = model.double()(fbank.double())
    assert mask is None
    state = model.state_dict()
    for b in range(2):
        ref = reference_features(state, cfg, fbank[b])
        assert ours32.shape[1] == ref.shape[0] == (frames // 16) * 8
        scale = ref.abs().max().item()
        assert (ours64[b] - ref).abs().max().item() <= 1e-10 * scale
        assert (ours32[b].double() - ref).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_within_twice_the_plain_path(dtype):
    cfg = CONFIGS["tiny"]
    model = random_encoder(cfg, seed=3)
    fbank = torch.randn(1, 203, 128, generator=torch.Generator().manual_seed(4))
    state = model.state_dict()
    truth = reference_features(state, cfg, fbank[0])
    plain = reference_features({k: v.to(dtype) for k, v in state.items()}, cfg, fbank[0].to(dtype), dtype=dtype)
    with torch.no_grad():
        ours, _ = model.to(dtype)(fbank)
    assert ours.dtype == dtype
    ours_err = (ours[0].double() - truth).abs().max().item()
    plain_err = (plain.double() - truth).abs().max().item()
    assert torch.isfinite(ours).all()
    assert ours_err <= 2 * plain_err, (ours_err, plain_err)


def test_right_padded_batch_equals_each_item_alone_with_poisoned_padding():
    cfg = CONFIGS["tiny"]
    model = random_encoder(cfg, seed=5)
    gen = torch.Generator().manual_seed(6)
    # 207: one padded frame in the last patch; 5 frames: no whole patch, an all-padding item
    lengths = [203, 120, 57, 16, 5, 208, 207]
    frames = 210
    items = [torch.randn(n, 128, generator=gen) for n in lengths]
    batch = torch.full((len(items), frames, 128), float("nan"))
    for i, item in enumerate(items):
        batch[i, : item.shape[0]] = item
    padding = torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        tokens, token_padding = model(batch, padding)
    n_max = (frames // 16) * 8
    assert tokens.shape == (len(items), n_max, cfg.encoder_embed_dim)
    assert torch.isfinite(tokens).all()
    for i, (n, item) in enumerate(zip(lengths, items)):
        valid = (n // 16) * 8
        assert token_padding[i].tolist() == [False] * valid + [True] * (n_max - valid)
        assert (tokens[i, valid:] == 0).all()
        if valid == 0:
            continue
        with torch.no_grad():
            alone, _ = model(item[None])
        assert alone.shape[1] == valid
        assert (tokens[i, :valid] - alone[0]).abs().max().item() <= 1e-5


def test_padding_mask_without_padding_changes_nothing():
    model = random_encoder(CONFIGS["tiny"], seed=7)
    fbank = torch.randn(3, 130, 128, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a, _ = model(fbank)
        b, mask = model(fbank, torch.zeros(3, 130, dtype=torch.bool))
    assert not mask.any()
    assert torch.equal(a, b)


def test_query_blocks_give_the_same_tokens():
    model = random_encoder(CONFIGS["tiny"], seed=9)
    fbank = torch.randn(2, 200, 128, generator=torch.Generator().manual_seed(10))
    padding = torch.zeros(2, 200, dtype=torch.bool)
    padding[1, 150:] = True
    with torch.no_grad():
        model.query_block = None
        whole, _ = model(fbank, padding)
        model.query_block = 40  # 96 tokens -> blocks of 40, 40, 16
        blocked, _ = model(fbank, padding)
    assert (whole - blocked).abs().max().item() <= 1e-6


def test_classify_averages_valid_token_logits():
    cfg = CONFIGS["tiny"]
    model = random_encoder(cfg, seed=11)
    fbank = torch.randn(2, 160, 128, generator=torch.Generator().manual_seed(12))
    padding = torch.zeros(2, 160, dtype=torch.bool)
    padding[1, 100:] = True
    with torch.no_grad():
        tokens, mask = model(fbank, padding)
        probs = model.classify(tokens, mask)
        alone = model.classify(*model(fbank[1:, :100]))
    ref = reference_features(model.state_dict(), cfg, fbank[0])
    logits = ref @ model.predictor.weight.double().T + model.predictor.bias.double()
    assert probs.shape == (2, cfg.predictor_class)
    assert (probs[0].double() - torch.sigmoid(logits.mean(0))).abs().max().item() <= 1e-6
    assert (probs[1] - alone[0]).abs().max().item() <= 1e-6


def test_bad_inputs_raise_input_error():
    model = BEATsEncoder(CONFIGS["tiny"]).eval()
    with pytest.raises(InputError, match="mel bins"):
        model(torch.randn(1, 100, 120))
    with pytest.raises(InputError, match="frames"):
        model(torch.randn(100, 128))
    with pytest.raises(InputError, match="padding mask"):
        model(torch.randn(2, 100, 128), torch.zeros(2, 99, dtype=torch.bool))


def test_exports_with_a_dynamic_number_of_time_patches():
    model = random_encoder(CONFIGS["tiny"], seed=13)
    model.query_block = None
    fbank = torch.randn(2, 96, 128)
    padding = torch.zeros(2, 96, dtype=torch.bool)
    padding[1, 70:] = True
    patches = torch.export.Dim("patches", min=2, max=256)
    program = torch.export.export(model, (fbank, padding), dynamic_shapes=({1: 16 * patches}, {1: 16 * patches}))
    exported = program.module()
    for frames in (48, 160):
        fbank = torch.randn(2, frames, 128)
        padding = torch.zeros(2, frames, dtype=torch.bool)
        padding[0, frames - 20 :] = True
        with torch.no_grad():
            want, want_mask = model(fbank, padding)
        got, got_mask = exported(fbank, padding)
        assert torch.equal(got_mask, want_mask)
        # same math, possibly different fp32 kernels and summation order: a few ulps of the output's scale
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
