"""Global gradient-norm clipping when parameters are sharded or replicated across model-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _squared_sum(grads: list[torch.Tensor], device) -> torch.Tensor:
    if grads:
        return torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
    return torch.zeros((), dtype=torch.float32, device=device)


def clip_grad_norm(
    params_counted: list[tuple[torch.nn.Parameter, bool]], max_norm: float, model_parallel_group,
    sharded: tuple[list[torch.nn.Parameter], object] | None = None,
) -> float:
    """`params_counted` pairs each local parameter with whether this rank's copy counts toward the norm (so
    that every element of the full model counts exactly once); `sharded`: parameters split over another group
    (expert weights over the expert-parallel group), every rank counting its own piece. Returns the global norm
    before clipping."""
    grads = [p.grad for p, _ in params_counted if p.grad is not None]
    counted = [p.grad for p, once in params_counted if once and p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = _squared_sum(counted, device)
    if sharded is not None:
        shard_grads = [p.grad for p in sharded[0] if p.grad is not None]
        shard_sq = _squared_sum(shard_grads, device)
        if sharded[1] is not None and dist.get_world_size(sharded[1]) > 1:
            dist.all_reduce(shard_sq, group=sharded[1])
        sq = sq + shard_sq
        grads += shard_grads
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(sq, group=model_parallel_group)
    total = sq.sqrt()
    if max_norm > 0 and grads:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return float(total)
