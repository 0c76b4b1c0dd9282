"""FSDP2 (torch.distributed.fsdp.fully_shard) for `distributed = "fsdp2"`: parameters, gradients and optimizer
state sharded over the ranks (ZeRO-3), for models whose full copy per rank does not fit (WAVE-7B).

Units (each all-gathered just before it runs and resharded after): every decoder layer; the audio tower,
the vision tower and BEATs, each whole (WaveModel calls them through __call__, so FSDP's hooks fire; inside
them their own code reads their weights); and the root, WaveModel itself, holding what WaveModel reads
directly outside any submodule call (token embeddings, final norm, rotary tables, the fusion head whose
first weight apply_head reads, the BEATs projection). LoRA adapters (peft) live inside the decoder layers
and shard with them; FSDP2 keeps frozen and trainable parameters in one unit.

Gradients are SUMMED over ranks (divide factor 1, sum-only collectives), as the DDP path sums: the loss is
info_nce_distributed, whose gradient on each rank is that rank's share of the global loss's gradient, so
the sum is the exact global gradient and W ranks equal one process on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Submodules of WaveModel sharded as one unit each (when present).
TOWERS = ("audio_tower", "visual", "beats")


def init_single_rank_group(backend: str) -> None:
    """A one-rank process group (no torchrun): FSDP2 needs a device mesh even on one rank."""
    import torch.distributed as dist

    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: nn.Module, device: torch.device, *, param_dtype: torch.dtype | None = None) -> list[nn.Module]:
    """fully_shard `model` (a WaveModel, LoRA already injected, requires_grad already set) over all ranks of
    the default process group on `device`'s type; parameters end up on `device` as sharded DTensors.
    param_dtype (e.g. torch.bfloat16) runs the forward and backward in that dtype through
    MixedPrecisionPolicy, with fp32 master weights, fp32 gradient reduction and fp32 optimizer state.
    Returns the FSDP units, root last."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units: list[nn.Module] = []
    for name in TOWERS:
        tower = getattr(model, name, None)
        if tower is not None and any(True for _ in tower.parameters()):
            units.append(tower)
    units += list(model.model.layers)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    units.append(model)
    for unit in units:
        assert isinstance(unit, FSDPModule)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; NCCL zero-copy)
    if param_dtype is not None:
        # A unit that has never run (the audio tower in a text-only step) has no unsharded parameter yet, and
        # FSDP2's post-backward of a backward without gradient sync (every GradCache chunk but the last)
        # reads it when a reduce dtype is set: AttributeError '_unsharded_param' (torch 2.11 and 2.13, on
        # CUDA and CPU; upstream: pytorch/pytorch#194058). One all-gather and reshard per unit creates it;
        # the reshard frees the storage.
        for unit in units:
            unit.unshard()
            unit.reshard()
    return units


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: whether the next backward reduce-scatters the gradients (True) or accumulates them unsharded
    for a later backward to reduce (False); a no-op for an unsharded model."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a mix of sharded (DTensor) and plain gradients: the global 2-norm
    (each sharded gradient's norm reduced over the mesh by DTensor, the plain ones, replicated on every rank,
    counted once), then every gradient scaled by min(1, max_norm / (norm + 1e-6)) as clip_grad_norm_ does.
    Without sharded gradients it is clip_grad_norm_ itself. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    plain = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    parts = [full_tensor(torch.nn.utils.get_total_norm([p.grad for p in sharded], 2.0))]
    if plain:
        parts.append(torch.nn.utils.get_total_norm([p.grad for p in plain], 2.0).to(parts[0].device))
    total = torch.linalg.vector_norm(torch.stack(parts))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
