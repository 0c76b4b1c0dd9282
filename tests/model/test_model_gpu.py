"""GPU checks (skipped without CUDA): in bf16/fp16 our fast path (batched, last-token capture, fused
fusion kernel) stays within 2x the error of the plain transformers path in the same dtype, both
measured against a float64 reference of the same weights."""

from __future__ import annotations

import pytest
import torch
import wave_reference as ref
from test_model_reference import build_cases, omni_model, reference_embedding

from wave_rt.config import WaveConfig
from wave_rt.model.batch import collate
from wave_rt.model.wave_model import WaveModel

pytestmark = pytest.mark.gpu


def _copy_model(model: WaveModel, device: str, dtype: torch.dtype) -> WaveModel:
    other = WaveModel.build(WaveConfig.from_dict(model.config.to_dict()), device=device, dtype=dtype, init="empty")
    other.load_state_dict({k: v.to(device) for k, v in model.state_dict().items()})
    return other


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_beats", [True, False])
def test_low_precision_error_at_most_twice_pytorch(tiny_token_ids, whisper_fe, dtype, use_beats):
    base = omni_model(tiny_token_ids, "all_layer", use_beats, seed=21)
    exact = _copy_model(base, "cpu", torch.float64)
    fast = _copy_model(base, "cuda", dtype)
    hf_exact = ref.hf_thinker(exact).double()
    cases = build_cases(exact, tiny_token_ids, whisper_fe)
    pad = tiny_token_ids["<|endoftext|>"]
    for case in cases:
        want = reference_embedding(exact, hf_exact, case)
        with torch.no_grad():
            ours = fast(collate([case.item], pad).to("cuda", dtype)).double().cpu()
        # the plain PyTorch path in the same dtype: the transformers reference formulation, on the GPU
        slow_model = _copy_model(base, "cuda", dtype)
        hf_slow = ref.hf_thinker(slow_model).to("cuda", dtype)
        case_gpu = type(case)(case.name, case.item, {k: (v.to("cuda", dtype) if torch.is_floating_point(v) else v.to("cuda"))
                                                    if isinstance(v, torch.Tensor) else v for k, v in case.hf_kwargs.items()},
                              [f.to("cuda", dtype) if f is not None else None for f in (case.fbanks or [])] or None,
                              case.n_segments, case.av)
        case_gpu.item = case.item
        slow = reference_embedding(slow_model, hf_slow, case_gpu).double().cpu()
        err_ours = (ours - want).abs().max().item()
        err_torch = (slow - want).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, (case.name, err_ours, err_torch)


def test_fp32_head_under_bf16_autocast_matches_fp32_linear(tiny_token_ids):
    """Training keeps the fusion head in fp32 while the backbone runs bf16 under autocast (bench_train.py, the
    Trainer's bf16 mode): the head must take the nn.Linear path, which autocast casts, not the one-dtype fused
    kernel (which raised KernelArgumentError on this layout). Checked against the head evaluated in float64 on
    the same bf16 layer states."""
    model = omni_model(tiny_token_ids, "all_layer", False, seed=5).to("cuda", torch.bfloat16)
    for p in model.classify_linear.parameters():
        p.data = p.data.float()
    hidden = model.config.text_config.hidden_size
    states = torch.randn(3, model.classify_linear[0].in_features // hidden, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = model.apply_head("all_layer", states)
    first, act, second = model.classify_linear
    x = states.double().reshape(states.shape[0], -1)
    want = torch.nn.functional.linear(act(torch.nn.functional.linear(x, first.weight.double(), first.bias.double())),
                                      second.weight.double(), second.bias.double())
    # bf16 matmuls under autocast: a loose bound, but a wrong layer order or a dropped bias is off by O(1)
    assert torch.allclose(got.double(), want, rtol=5e-2, atol=5e-2), (got.double() - want).abs().max().item()
