"""The LLM + head part takes tensors only and has no data-dependent Python control flow: torch.export
traces it once with symbolic batch and sequence sizes, and the exported program matches eager on new
shapes and padding patterns."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import tiny_thinker_config_dict

from wave_rt.config import WaveConfig
from wave_rt.model.wave_model import WaveModel


class Core(torch.nn.Module):
    def __init__(self, model: WaveModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds, attention_mask, position_ids, use_head):
        return self.model.forward_core(embeds, attention_mask, position_ids, use_head)


def _inputs(B: int, T: int, pad: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, T, 64, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    pos = torch.ones(3, B, T, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
        pos[:, b, p:] = torch.arange(T - p)
    use_head = torch.arange(B) % 2 == 0
    return embeds, mask, pos, use_head


@pytest.mark.parametrize("recipe", ["all_layer", "last_token"])
def test_core_exports_with_dynamic_shapes(tiny_token_ids, recipe):
    data = tiny_thinker_config_dict(tiny_token_ids)
    if recipe == "all_layer":
        data.update(train_classify=True, classify_type="all_layer")
    core = Core(WaveModel.build(WaveConfig.from_dict(data), seed=0))
    B, T = torch.export.Dim("B", min=1, max=256), torch.export.Dim("T", min=2, max=8192)
    program = torch.export.export(
        core, _inputs(2, 9, [0, 3], 0),
        dynamic_shapes=({0: B, 1: T}, {0: B, 1: T}, {1: B, 2: T}, {0: B}), strict=False,
        prefer_deferred_runtime_asserts_over_guards=True,  # torch 2.11 cannot prove Min(16T, 32T) == 16T
    )
    for B_, T_, pad in ((3, 17, [5, 0, 16]), (1, 4, [0]), (5, 33, [0, 1, 2, 30, 7])):
        args = _inputs(B_, T_, pad, seed=B_)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*args), core(*args), rtol=1e-6, atol=1e-6)
