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


def average_gradients(params: Iterable[torch.nn.Parameter], group, bucket_bytes: int = 25 * 2**20) -> None:
    world = dist.get_world_size(group)
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        flat.div_(world)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            g.copy_(synced)
