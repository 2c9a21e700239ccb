"""Tensor (and sequence) parallelism of an MoE feed-forward: every expert's hidden size is split over the
tensor-parallel ranks (Megatron's expert tensor parallelism), routing is replicated.

    tokens    all of them on every rank: as they are without SP; all-gathered over the sequence with SP, with a
              backward that keeps this rank's slice (the grads below are complete and equal on every rank)
    router    replicated: the same tokens, logits, top-k and auxiliary losses on every rank, so its gradient is
              complete on every rank and needs no sum (unlike other replicated weights under SP)
    experts   gate/up split along the hidden size (column-parallel), down along its input (row-parallel); the
              shared experts likewise. Their input enters the TP region (backward all-reduce), the routing
              weights too (each rank's partial outputs give a partial gradient of the weights)
    output    the partial sums are reduced once after combining: all-reduce, or reduce-scatter to the sequence
              shard with SP
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.tensor import comm
from parallel.tensor.layers import shard_rows
from pretrain.model.moe import MoE, SwiGLU


class TensorParallelMoE(MoE):
    """Takes over a plain `MoE` (its router, buffers and statistics) with this rank's expert shards."""

    def __init__(self, moe: MoE, group, sequence_parallel: bool):
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in moe.__dict__.items() if not k.startswith("_")})
        self._buffers, self._non_persistent_buffers_set = moe._buffers, moe._non_persistent_buffers_set
        self.router = moe.router
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.experts = moe.experts
        for name, dim in (("gate", 2), ("up", 2), ("down", 1)):
            full = getattr(moe.experts, name).detach()
            shard = full.chunk(world, dim=dim)[rank].clone()
            setattr(self.experts, name, nn.Parameter(shard))
        self.shared = _shard_swiglu(moe.shared, rank, world) if moe.shared is not None else None
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = comm.gather_sequence_whole(x, self.group)
        batch, seq, d = x.shape
        flat = x.reshape(-1, d)
        logits, scores, ids, weights = self.route(flat)
        partial = self.experts_output(comm.copy_to_tp(flat, self.group), ids, comm.copy_to_tp(weights, self.group))
        partial = partial.view(batch, seq, d)
        if self.sequence_parallel:
            out = comm.reduce_scatter_sequence(partial, self.group)
        else:
            out = comm.reduce_from_tp(partial, self.group)
        return self.finish(out, logits, scores, ids, batch, seq)


def _shard_swiglu(mlp: SwiGLU, rank: int, world: int) -> SwiGLU:
    """A SwiGLU holding this rank's slice of the hidden size; its output is a partial sum (no communication)."""
    for name in ("gate_proj", "up_proj"):
        getattr(mlp, name).weight = nn.Parameter(shard_rows(getattr(mlp, name).weight, rank, world))
    mlp.down_proj.weight = nn.Parameter(shard_rows(mlp.down_proj.weight.t(), rank, world).t().contiguous())
    return mlp


def tensor_parallel_moe_specs(prefix: str, rank: int, world: int, spec_type) -> dict:
    """Shard specs of a `TensorParallelMoE`'s parameters named under `prefix` (e.g. 'layers.1.mlp')."""
    split = lambda dim: spec_type("split", rank, world, dim=dim)  # noqa: E731
    return {
        f"{prefix}.router.weight": spec_type("replicated", rank, world),  # complete on every rank: never summed
        f"{prefix}.experts.gate": split(2), f"{prefix}.experts.up": split(2), f"{prefix}.experts.down": split(1),
        f"{prefix}.shared.gate_proj.weight": split(0), f"{prefix}.shared.up_proj.weight": split(0),
        f"{prefix}.shared.down_proj.weight": split(1),
    }
