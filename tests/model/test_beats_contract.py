"""BEATs structural contract: state-dict keys/shapes of the released checkpoint, config handling, the
relative-position bucket table (hand-computed) and the token-count formula."""

from __future__ import annotations

import json

import pytest
import torch

from wave_rt.model.beats import BEATsConfig, BEATsEncoder
from wave_rt.model.beats_attention import relative_position_bucket


def released_key_table(
    *, patch: int, embed: int, width: int, layers: int, heads: int, ffn: int, conv_pos: int, groups: int,
    buckets: int, classes: int | None, conv_bias: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference BEATs module (unilm beats/BEATs.py + backbone.py), written out from its
    module definitions: Conv2d patch embedding (bias only with conv_bias), LayerNorm(embed_dim),
    post_extract_proj when embed_dim != encoder_embed_dim, pos_conv = Sequential(weight_norm(Conv1d, dim=2),
    SamePad, GELU) -> pos_conv.0.{weight_g [1,1,K], weight_v [C, C/groups, K], bias}, every layer's
    MultiheadAttention (k/v/q/out_proj, grep_linear [8, head_dim], grep_a [1,H,1,1], the tied
    relative_attention_bias Embedding(num_buckets, H) listed under each layer), two LayerNorms, fc1/fc2,
    encoder.layer_norm, and predictor Linear(C, classes) for fine-tuned models."""
    t: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (embed, 1, patch, patch),
        "layer_norm.weight": (embed,),
        "layer_norm.bias": (embed,),
        "encoder.pos_conv.0.weight_g": (1, 1, conv_pos),
        "encoder.pos_conv.0.weight_v": (width, width // groups, conv_pos),
        "encoder.pos_conv.0.bias": (width,),
        "encoder.layer_norm.weight": (width,),
        "encoder.layer_norm.bias": (width,),
    }
    if conv_bias:
        t["patch_embedding.bias"] = (embed,)
    if embed != width:
        t["post_extract_proj.weight"] = (width, embed)
        t["post_extract_proj.bias"] = (width,)
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = (width, width)
            t[p + f"self_attn.{proj}.bias"] = (width,)
        t[p + "self_attn.grep_linear.weight"] = (8, width // heads)
        t[p + "self_attn.grep_linear.bias"] = (8,)
        t[p + "self_attn.grep_a"] = (1, heads, 1, 1)
        t[p + "self_attn.relative_attention_bias.weight"] = (buckets, heads)
        t[p + "fc1.weight"] = (ffn, width)
        t[p + "fc1.bias"] = (ffn,)
        t[p + "fc2.weight"] = (width, ffn)
        t[p + "fc2.bias"] = (width,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + f"{norm}.weight"] = (width,)
            t[p + f"{norm}.bias"] = (width,)
    if classes is not None:
        t["predictor.weight"] = (classes, width)
        t["predictor.bias"] = (classes,)
    return t


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_config_matches_released_iter3_plus_as2m_keys():
    with torch.device("meta"):
        model = BEATsEncoder(BEATsConfig())
    expected = released_key_table(patch=16, embed=512, width=768, layers=12, heads=12, ffn=3072, conv_pos=128,
                                  groups=16, buckets=320, classes=527)
    got = shapes_of(model)
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    # A few literal rows, so the table above cannot drift together with the module.
    assert len(got) == 252
    assert got["encoder.pos_conv.0.weight_v"] == (768, 48, 128)
    assert got["encoder.pos_conv.0.weight_g"] == (1, 1, 128)
    assert got["encoder.layers.11.self_attn.relative_attention_bias.weight"] == (320, 12)
    assert got["encoder.layers.5.self_attn.grep_linear.weight"] == (8, 64)
    assert got["predictor.weight"] == (527, 768)
    assert "patch_embedding.bias" not in got
    # The reference module has 90,717,055 distinct parameters (its parameters() counts the tied table
    # once); the state dict lists the table 11 more times.
    assert sum(v.numel() for v in model.state_dict().values()) == 90_717_055 + 11 * 320 * 12


def test_tiny_config_key_table():
    cfg = BEATsConfig.tiny()
    model = BEATsEncoder(cfg)
    expected = released_key_table(patch=16, embed=24, width=32, layers=2, heads=4, ffn=48, conv_pos=16, groups=4,
                                  buckets=32, classes=5)
    assert shapes_of(model) == expected


@pytest.mark.parametrize(
    "overrides, drop_predictor",
    [({"finetuned_model": False}, True), ({"embed_dim": 32, "conv_bias": True}, False)],
    ids=["pretrained-only", "no-projection+conv-bias"],
)
def test_optional_parts_follow_the_config(overrides, drop_predictor):
    cfg = BEATsConfig.from_dict({**BEATsConfig.tiny().to_dict(), **overrides})
    got = shapes_of(BEATsEncoder(cfg))
    expected = released_key_table(patch=16, embed=cfg.embed_dim, width=32, layers=2, heads=4, ffn=48, conv_pos=16,
                                  groups=4, buckets=32, classes=None if drop_predictor else 5,
                                  conv_bias=cfg.conv_bias)
    assert got == expected


def test_checkpoint_state_dict_loads_strictly_and_relative_tables_are_independent_copies():
    cfg = BEATsConfig.tiny()
    src, dst = BEATsEncoder(cfg), BEATsEncoder(cfg)
    state = src.state_dict()
    # The released file holds one tied table under every layer's name.
    table = torch.randn(32, 4)
    for i in range(cfg.encoder_layers):
        state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    dst.load_state_dict(state, strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k
    ptrs = {dst.state_dict()[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"].data_ptr()
            for i in range(cfg.encoder_layers)}
    assert len(ptrs) == cfg.encoder_layers  # untied here, so safetensors can store the state dict


def test_config_defaults_are_iter3_plus_as2m_and_unknown_keys_survive():
    cfg = BEATsConfig()
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.encoder_ffn_embed_dim) == (
        12, 768, 12, 3072)
    assert (cfg.input_patch_size, cfg.embed_dim, cfg.conv_pos, cfg.conv_pos_groups) == (16, 512, 128, 16)
    assert (cfg.num_buckets, cfg.max_distance, cfg.gru_rel_pos, cfg.relative_position_embedding) == (320, 800, True, True)
    assert (cfg.deep_norm, cfg.layer_norm_first, cfg.finetuned_model, cfg.predictor_class) == (True, False, True, 527)

    released = {**cfg.to_dict(), "some_future_field": [1, 2], "encoder_layers": 3}
    back = BEATsConfig.from_dict(released)
    assert back.encoder_layers == 3
    assert back.extra == {"some_future_field": [1, 2]}
    assert back.to_dict() == released
    assert BEATsConfig.from_dict(json.loads(json.dumps(back.to_dict()))) == back


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"activation_fn": "glu"}, "activation_fn"),
        ({"encoder_attention_heads": 5}, "not divisible"),
        ({"layer_norm_first": True}, "deep_norm and layer_norm_first"),
        ({"input_patch_size": 0}, "input_patch_size"),
    ],
)
def test_unsupported_configs_are_refused(overrides, fragment):
    cfg = BEATsConfig.from_dict({**BEATsConfig.tiny().to_dict(), **overrides})
    with pytest.raises(ValueError, match=fragment):
        BEATsEncoder(cfg)


# Hand-computed bidirectional T5 buckets. num_buckets=16, max_distance=20: 8 buckets per direction,
# positive offsets (key after query) add 8; |offset| < 4 is exact; otherwise
# 4 + floor(4 * ln(|offset| / 4) / ln(20 / 4)), at most 7:
#   |o|=4: 0 -> 4    5: 4*0.2231/1.6094 = 0.555 -> 4    6: 4*0.4055/1.6094 = 1.008 -> 5    7: 1.391 -> 5
#   8: 1.723 -> 5    9: 2.015 -> 6    10: 2.277 -> 6    13: 2.929 -> 6    14: 3.113 -> 7    20: 4 -> cap 7
HAND_TABLE_16_20 = {
    0: 0, 1: 9, 2: 10, 3: 11, 4: 12, 5: 12, 6: 13, 7: 13, 8: 13, 9: 14, 10: 14, 13: 14, 14: 15, 20: 15, 1000: 15,
    -1: 1, -2: 2, -3: 3, -4: 4, -5: 4, -6: 5, -7: 5, -8: 5, -9: 6, -10: 6, -13: 6, -14: 7, -20: 7, -1000: 7,
}
# The released config, num_buckets=320, max_distance=800: 160 per direction, exact below 80, else
# 80 + floor(80 * ln(|o| / 80) / ln(10)):  100 -> 80 + floor(7.75) = 87;  160 -> 80 + floor(24.08) = 104;
# 400 -> 80 + floor(55.92) = 135;  799 -> 80 + floor(79.96) = 159;  >= 800 -> cap 159.
HAND_TABLE_320_800 = {
    0: 0, 1: 161, 79: 239, -79: 79, 80: 240, -80: 80, 100: 247, -100: 87, 160: 264, -160: 104,
    400: 295, -400: 135, 799: 319, -799: 159, 800: 319, -5000: 159,
}


@pytest.mark.parametrize("num_buckets, max_distance, table", [(16, 20, HAND_TABLE_16_20), (320, 800, HAND_TABLE_320_800)])
def test_relative_position_buckets_match_hand_table(num_buckets, max_distance, table):
    offsets = torch.tensor(list(table))
    got = relative_position_bucket(offsets, num_buckets, max_distance)
    assert dict(zip(table, got.tolist())) == table


def test_bias_by_offset_reads_the_bucketed_table():
    cfg = BEATsConfig.tiny()
    attn = BEATsEncoder(cfg).encoder.layers[0].self_attn
    n = 70
    got = attn.relative_bias_by_offset(n)
    weight = attn.relative_attention_bias.weight
    for offset in (-69, -20, -3, 0, 2, 9, 40, 69):
        bucket = relative_position_bucket(torch.tensor([offset]), cfg.num_buckets, cfg.max_distance)
        assert torch.equal(got[offset + n - 1], weight[bucket[0]])


@pytest.mark.parametrize("frames", [16, 17, 31, 32, 100, 1024, 1031])
def test_token_count_is_whole_time_patches_times_eight(frames):
    model = BEATsEncoder(BEATsConfig.tiny()).eval()
    with torch.no_grad():
        tokens, mask = model(torch.randn(1, frames, 128))
    assert tokens.shape == (1, (frames // 16) * 8, 32)
    assert mask is None
    assert BEATsConfig.tiny().num_tokens(frames) == (frames // 16) * 8


def test_ten_seconds_give_512_tokens_at_full_width():
    with torch.device("meta"):
        model = BEATsEncoder(BEATsConfig())
        tokens, _ = model(torch.empty(1, 1024, 128))
    assert tuple(tokens.shape) == (1, 512, 768)
