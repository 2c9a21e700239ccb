"""Gradient averaging over the data-parallel group, in flat buckets (one all-reduce per bucket)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def buckets(tensors: Iterable[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors, each group at most `bucket_bytes` (or one oversize tensor)."""
    out: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and (size + nbytes > bucket_bytes or t.dtype != current[0].dtype):
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        out.append(current)
    return out


def average_gradients(params: Iterable[torch.nn.Parameter], group, bucket_bytes: int = 25 * 2**20,
                      divide_by: int | None = None) -> None:
    """Sum the grads over `group` and divide by its size (or by `divide_by`)."""
    world = dist.get_world_size(group) if group is not None else 1
    divisor = divide_by or world
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1:
        if divisor != 1 and grads:
            torch._foreach_div_(grads, divisor)
        return
    for bucket in buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        flat.div_(divisor)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            g.copy_(synced)
