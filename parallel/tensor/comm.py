"""The conjugate communication pairs of Megatron-style tensor and sequence parallelism, as autograd functions.

    function                   forward                     backward
    copy_to_tp                 identity                    all-reduce
    reduce_from_tp             all-reduce                  identity
    gather_last_dim            all-gather (last dim)       take own slice
    gather_sequence            all-gather (dim 1)          reduce-scatter (dim 1)
    reduce_scatter_sequence    reduce-scatter (dim 1)      all-gather (dim 1)
    split_sequence             take own slice (dim 1)      all-gather (dim 1)
    gather_sequence_whole      all-gather (dim 1)          take own slice (dim 1)

`gather_sequence_whole` is for consumers that then compute the same thing on every rank (an MoE router on all
tokens): their input gradients are already complete and equal on every rank, so nothing is summed.

Activations are [batch, seq, hidden]; sequence parallelism shards dim 1. Collectives use dim-0
concatenation only (what gloo supports), so tensors are moved to dim 0 and back around them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.12 names the dim-0 collectives *_single; older releases only have the *_tensor names.
all_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_dim0 = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group) -> int:
    return dist.get_world_size(group)


def _rank(group) -> int:
    return dist.get_rank(group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_dim0(out, moved, group=group)
    # contiguous: every layer reading the gathered input (q/k/v, gate/up) would otherwise flatten its own copy
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % world:
        raise ValueError(f"dim {dim} of size {moved.shape[0]} is not divisible by the tensor-parallel size {world}")
    out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_dim0(out, moved, group=group)
    return out.movedim(0, dim)


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if x.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim=dim)[_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, -1, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, 1, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 1, ctx.group), None


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 1, ctx.group), None


class _GatherSequenceWhole(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, 1, ctx.group), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def gather_last_dim(x, group):
    return _GatherLastDim.apply(x, group)


def gather_sequence(x, group):
    return _GatherSequence.apply(x, group)


def reduce_scatter_sequence(x, group):
    return _ReduceScatterSequence.apply(x, group)


def split_sequence(x, group):
    return _SplitSequence.apply(x, group)


def gather_sequence_whole(x, group):
    return _GatherSequenceWhole.apply(x, group)
