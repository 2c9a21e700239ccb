"""Megatron-style tensor-parallel layers in plain torch: column/row-parallel linear, vocab-parallel embedding.

Each layer is built from the full (unsharded) module of the plain model and keeps only this rank's shard,
so `parallelize` can swap them in place and a test can compare against the original module.
With `sequence_parallel`, activations outside the tensor-parallel regions are sharded along the sequence:
column-parallel layers all-gather their input over the sequence, row-parallel layers reduce-scatter
their output back to sequence shards.

A LoRA-adapted linear (`pretrain/model/lora.py`) keeps its adapter, cut to match: a column-parallel layer holds
all of A and its rows of B (its output rows); a row-parallel layer holds its columns of A (its input columns)
and all of B, and adds B·A_shard·x_shard to its partial sums before they are reduced. The replicated half of
each adapter gets a partial gradient on every rank, completed over the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor import comm
from pretrain.model.lora import LoRALinear, lora_delta


def shard_rows(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if weight.shape[0] % world:
        raise ValueError(f"cannot split {weight.shape[0]} rows over {world} tensor-parallel ranks")
    return weight.detach().chunk(world, dim=0)[rank].clone()


class AdaptedLinear(nn.Module):
    """A tensor-parallel linear layer's (optional) LoRA adapter: this rank's slices of A and B."""

    lora_a: nn.Parameter | None
    lora_b: nn.Parameter | None

    def _no_adapter(self) -> None:
        self.lora_a = self.lora_b = None
        self.enabled = True

    def attach_adapter(self, source: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Take `source`'s adapter (a `LoRALinear`; anything else has none) with these slices of A and B."""
        if not isinstance(source, LoRALinear):
            return
        self.lora_a = nn.Parameter(lora_a.detach().clone())
        self.lora_b = nn.Parameter(lora_b.detach().clone())
        self.scale, self.dropout, self.enabled = source.scale, source.dropout, source.enabled

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.lora_a is None or not self.enabled:
            return None
        return lora_delta(x, self.lora_a, self.lora_b, self.scale, self.dropout)


def enter_tensor_parallel_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The input side of a TP region: all-gather the sequence shards (SP), or mark the point whose backward
    all-reduces the input grad. Several column-parallel layers reading the same input share one entry."""
    return comm.gather_sequence(x, group) if sequence_parallel else comm.copy_to_tp(x, group)


class EnterTensorParallelRegion:
    """A forward hook for the module whose output feeds column-parallel layers (the norm before q/k/v, before
    gate/up, before the LM head): one all-gather (SP) or one backward all-reduce per region, as Megatron's fused
    QKV and gate/up layers have, instead of one per projection."""

    def __init__(self, group, sequence_parallel: bool):
        self.group = group
        self.sequence_parallel = sequence_parallel

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return enter_tensor_parallel_region(output, self.group, self.sequence_parallel)


class ColumnParallelLinear(AdaptedLinear):
    """y = x W^T with W split by output rows; the output stays split along its last dim.

    With `enters_region=False` the input has already been through `enter_tensor_parallel_region` (shared with
    sibling layers); otherwise this layer does it itself."""

    def __init__(
        self, weight_shard: torch.Tensor, group, sequence_parallel: bool = False, enters_region: bool = True
    ):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.enters_region = enters_region
        self._no_adapter()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group, sequence_parallel: bool = False, enters_region: bool = True
    ) -> ColumnParallelLinear:
        assert getattr(linear, "bias", None) is None, "the model's linears have no bias"
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        layer = cls(shard_rows(linear.weight, rank, world), group, sequence_parallel, enters_region)
        if isinstance(linear, LoRALinear):
            layer.attach_adapter(linear, linear.lora_a, shard_rows(linear.lora_b, rank, world))
        return layer

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enters_region:
            x = enter_tensor_parallel_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight)
        delta = self.adapter_output(x)
        return y if delta is None else y + delta


class RowParallelLinear(AdaptedLinear):
    """y = x W^T with W split by input columns; x arrives split along its last dim; partial sums are reduced."""

    def __init__(self, weight_shard: torch.Tensor, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.group = group
        self.sequence_parallel = sequence_parallel
        self._no_adapter()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, sequence_parallel: bool = False) -> RowParallelLinear:
        assert getattr(linear, "bias", None) is None, "the model's linears have no bias"
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        columns = lambda t: shard_rows(t.t(), rank, world).t().contiguous()  # noqa: E731
        layer = cls(columns(linear.weight), group, sequence_parallel)
        if isinstance(linear, LoRALinear):
            layer.attach_adapter(linear, columns(linear.lora_a), linear.lora_b)
        return layer

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        delta = self.adapter_output(x)  # B · (this rank's part of A x): a partial sum like the base's
        if delta is not None:
            partial = partial + delta
        if self.sequence_parallel:
            return comm.reduce_scatter_sequence(partial, self.group)
        return comm.reduce_from_tp(partial, self.group)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; ids outside it contribute zeros, then ranks sum."""

    def __init__(self, weight_shard: torch.Tensor, vocab_start: int, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, sequence_parallel: bool = False) -> VocabParallelEmbedding:
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        shard = shard_rows(emb.weight, rank, world)
        return cls(shard, rank * shard.shape[0], group, sequence_parallel)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_sequence(out, self.group)
        return comm.reduce_from_tp(out, self.group)
