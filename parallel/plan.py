"""`parallelize(model, grid)`: apply the configured parallelism to a plain model and return the plan the
training loop uses for everything layout-dependent — the loss, gradient sync, clipping and the mapping
between this rank's shards and layout-free (full) tensors for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel.data_parallel import average_gradients
from parallel.grad_norm import clip_grad_norm
from parallel.grid import ProcessGrid
from parallel.tensor.apply import (
    ShardSpec,
    apply_tensor_parallel,
    gather_full,
    shard_of,
    sync_tensor_parallel_grads,
)
from parallel.tensor.loss import vocab_parallel_lm_loss
from pretrain.model.loss import lm_loss


@dataclass
class ParallelPlan:
    grid: ProcessGrid
    specs: dict[str, ShardSpec]
    sequence_parallel: bool
    vocab_size: int
    grad_bucket_bytes: int = 25 * 2**20

    @property
    def tp(self) -> int:
        return self.grid.size("tp")

    def loss(self, logits, labels, label_smoothing=0.0, z_loss=0.0):
        if self.tp == 1:
            return lm_loss(logits, labels, label_smoothing, z_loss)
        vocab_start = self.grid.coords["tp"] * (self.vocab_size // self.tp)
        return vocab_parallel_lm_loss(
            logits, labels, self.grid.group("tp"), vocab_start, self.vocab_size, label_smoothing, z_loss
        )

    def sync_grads(self, model: nn.Module) -> None:
        if self.tp > 1:
            sync_tensor_parallel_grads(model, self.specs, self.grid.group("tp"))
        if self.grid.size("dp") > 1:
            average_gradients(model.parameters(), self.grid.group("dp"), self.grad_bucket_bytes)

    def clip(self, model: nn.Module, max_norm: float) -> float:
        counted = [(p, self.specs[name].counted_once) for name, p in model.named_parameters()]
        return clip_grad_norm(counted, max_norm, self.grid.group("model"))

    def full_tensors(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layout-free tensors from this rank's shards (parameters, or optimizer states named '<param>/<key>').
        Collective over the tensor-parallel group: every rank must call it."""
        out = {}
        for name, t in local.items():
            spec = self.spec(name)
            out[name] = t.detach().clone() if t.dim() == 0 else gather_full(t, spec, self.grid.group("tp"))
        return out

    def local_tensors(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's shards cut from layout-free tensors (no communication)."""
        return {name: t if t.dim() == 0 else shard_of(t, self.spec(name)).clone() for name, t in full.items()}

    def spec(self, name: str) -> ShardSpec:
        return self.specs.get(name.split("/", 1)[0], ShardSpec("replicated"))


def parallelize(
    model: nn.Module, grid: ProcessGrid, sequence_parallel: bool = False, grad_bucket_mb: int = 25
) -> ParallelPlan:
    specs: dict[str, ShardSpec]
    if grid.size("tp") > 1:
        specs = apply_tensor_parallel(model, grid.group("tp"), sequence_parallel)
    else:
        specs = {name: ShardSpec("replicated") for name, _ in model.named_parameters()}
    sp = sequence_parallel and grid.size("tp") > 1
    return ParallelPlan(grid, specs, sp, model.cfg.vocab_size, grad_bucket_mb * 2**20)

