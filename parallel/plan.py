"""`parallelize(model, grid)`: apply the configured parallelism to a plain model and return the plan the
training loop uses for everything layout-dependent — the loss, gradient sync, clipping, the pipeline (if any)
and the mapping between this rank's shards and layout-free (full) tensors for checkpoints.

Order: tensor parallelism shards every module, then pipeline parallelism keeps this rank's stages and drops
the rest (names stay the full model's)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from parallel.context import ContextParallel
from parallel.data_parallel import OverlappedGradientAverager, average_gradients
from parallel.experts import apply_expert_parallel
from parallel.grad_norm import clip_grad_norm
from parallel.grid import ProcessGrid
from parallel.pipeline.partition import plan_stages, stages_of_rank
from parallel.pipeline.stages import StageModule, last_stage_holds_embedding, prune_model
from parallel.tensor.apply import (
    ShardSpec,
    apply_tensor_parallel,
    gather_full,
    shard_of,
    sync_tensor_parallel_grads,
)
from parallel.tensor.loss import vocab_parallel_lm_loss, vocab_parallel_token_logprobs
from pretrain.model.loss import lm_loss
from pretrain.model.preference_loss import token_logprobs

if TYPE_CHECKING:
    from parallel.pipeline.runner import PipelineRunner


@dataclass
class PipelineOptions:
    schedule: str = "1f1b"
    virtual_stages: int = 1
    layers: list[int] = field(default_factory=list)  # explicit layers per stage; empty: balanced
    seq_len: int = 0
    micro_batch_size: int = 1
    n_microbatches: int = 1


@dataclass
class ParallelPlan:
    grid: ProcessGrid
    specs: dict[str, ShardSpec]
    sequence_parallel: bool
    vocab_size: int
    grad_bucket_bytes: int = 25 * 2**20
    pipeline: PipelineRunner | None = None
    tied_embedding: bool = False  # the first and last pipeline stage each hold the embedding (tied head or MTP)
    not_counted: frozenset[str] = frozenset()  # local copies that another rank already counts in the grad norm
    local_names: set[str] | None = None  # parameters this rank holds, when it holds only some (pipeline)
    expert_names: frozenset[str] = frozenset()  # expert weights split over the expert-parallel group
    context: ContextParallel | None = None  # the sequence split over the context-parallel group
    overlapped: OverlappedGradientAverager | None = None  # data-parallel averaging started during the backward
    grad_reduce_dtype: torch.dtype | None = None  # data-parallel sums in this dtype (None: the gradients')

    @property
    def tp(self) -> int:
        return self.grid.size("tp")

    @property
    def cp(self) -> int:
        return self.grid.size("cp")

    def loss(self, logits, labels, label_smoothing=0.0, z_loss=0.0):
        if self.tp == 1:
            loss, metrics = lm_loss(logits, labels, label_smoothing, z_loss)
        else:
            vocab_start = self.grid.coords["tp"] * (self.vocab_size // self.tp)
            loss, metrics = vocab_parallel_lm_loss(
                logits, labels, self.grid.group("tp"), vocab_start, self.vocab_size, label_smoothing, z_loss
            )
        if self.context is not None:  # this rank's share of the whole window's mean
            share = self.context.loss_share(labels)
            loss, metrics = loss * share, {name: value * share for name, value in metrics.items()}
        return loss, metrics

    def token_logprobs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] log p(label) per position (0 where ignored), from this rank's logits (a vocabulary slice under TP)."""
        if self.tp == 1:
            return token_logprobs(logits, labels)
        vocab_start = self.grid.coords["tp"] * (self.vocab_size // self.tp)
        return vocab_parallel_token_logprobs(logits, labels, self.grid.group("tp"), vocab_start)

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a batch of whole windows this rank computes (its sequence shard under context parallelism)."""
        return batch if self.context is None else self.context.split_batch(batch)

    @property
    def pp(self) -> int:
        return self.grid.size("pp")

    @property
    def tied_embedding_group(self):
        """The first and last stage of this rank's pipeline, when both hold a copy of the tied embedding."""
        if self.tied_embedding and self.pp > 1 and self.grid.size("embedding") > 1:
            return self.grid.group("embedding")
        return None

    def sync_tied_embedding(self, model: nn.Module) -> None:
        """Sum the tied embedding's gradient over its first- and last-stage copies (no-op elsewhere)."""
        group = self.tied_embedding_group
        if group is not None:
            if model.embed.weight.grad is None:
                model.embed.weight.grad = torch.zeros_like(model.embed.weight)
            dist.all_reduce(model.embed.weight.grad, group=group)

    def merged_over_stages(self, local: dict) -> dict:
        """Every pipeline stage's entries on every rank (collective over the pipeline group); a name held by
        several stages (the tied embedding) keeps the first stage's value."""
        if self.pp == 1:
            return local
        pieces: list[dict | None] = [None] * self.pp
        dist.all_gather_object(pieces, local, group=self.grid.group("pp"))
        merged: dict = {}
        for piece in pieces:
            for name, value in piece.items():
                merged.setdefault(name, value)
        return merged

    def overlap_grad_reduce(self, model: nn.Module, microbatches: int, register_hook=None) -> None:
        """Average the data- and context-parallel gradients during the backward (see OverlappedGradientAverager;
        `register_hook`: how a parameter signals its gradient, see there); `sync_grads` then waits for it.
        Nothing to do on a single data-parallel rank."""
        if self.grid.size("dp_cp") == 1:
            return
        named = list(model.named_parameters())
        dense = [p for name, p in named if name not in self.expert_names]
        experts = [p for name, p in named if name in self.expert_names]
        groups = [(dense, self.grid.group("dp_cp"), self.grid.size("dp_cp"))]
        if experts:
            groups.append((experts, self.grid.group("expert_dp_cp"), self.grid.size("dp_cp")))
        self.overlapped = OverlappedGradientAverager(groups, microbatches, self.grad_bucket_bytes,
                                                     self.grad_reduce_dtype, register_hook)

    def sync_grads(self, model: nn.Module) -> None:
        if self.overlapped is not None:  # averaged first: the sums below change .grad, not the buckets in flight
            self.overlapped.finish()
        if self.tp > 1:
            sync_tensor_parallel_grads(model, self.specs, self.grid.group("tp"))
        self.sync_tied_embedding(model)
        named = list(model.named_parameters())
        if self.overlapped is None and self.grid.size("dp_cp") > 1:  # data/context-parallel ranks saw other tokens
            dense = [p for name, p in named if name not in self.expert_names]
            average_gradients(dense, self.grid.group("dp_cp"), self.grad_bucket_bytes,
                              reduce_dtype=self.grad_reduce_dtype)
        if self.overlapped is None and self.expert_names and self.grid.size("dp_cp") > 1:
            # each expert's grad already holds its whole EP group's tokens (all-to-all backward): sum over the
            # ranks holding the same experts, divide by all data- and context-parallel ranks
            experts = [p for name, p in named if name in self.expert_names]
            average_gradients(experts, self.grid.group("expert_dp_cp"), self.grad_bucket_bytes,
                              divide_by=self.grid.size("dp_cp"), reduce_dtype=self.grad_reduce_dtype)

    def clip(self, model: nn.Module, max_norm: float) -> float:
        counted = [(p, self.specs[name].counted_once and name not in self.not_counted)
                   for name, p in model.named_parameters() if name not in self.expert_names]
        experts = [p for name, p in model.named_parameters() if name in self.expert_names]
        return clip_grad_norm(counted, max_norm, self.grid.group("model"),
                              sharded=(experts, self.grid.group("ep")) if experts else None)

    def full_tensors(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layout-free tensors from this rank's shards (parameters, or optimizer states named '<param>/<key>').
        Collective over the tensor- and pipeline-parallel groups: every rank must call it."""
        out = {}
        for name, t in local.items():
            spec = self.spec(name)
            if t.dim() == 0:
                out[name] = t.detach().clone()
                continue
            out[name] = gather_full(t, spec, self.grid.group(spec.group))
            if spec.outer is not None:
                out[name] = gather_full(out[name], spec.outer, self.grid.group(spec.outer.group))
        return self.merged_over_stages(out)  # each stage holds different names

    def local_tensors(self, full: dict[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
        """This rank's shards cut from layout-free tensors (no communication); with pipeline parallelism, only
        those of the parameters this rank's stages hold. `copy=False`: views of `full` where possible."""
        out = {}
        for name, t in full.items():
            if self.local_names is not None and name.split("/", 1)[0] not in self.local_names:
                continue
            spec = self.spec(name)
            if t.dim() > 0 and spec.outer is not None:
                t = shard_of(t, spec.outer)
            shard = t if t.dim() == 0 else shard_of(t, spec)
            out[name] = shard.clone() if copy and shard.dim() > 0 else shard
        return out

    def placement(self, name: str, local_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where this rank's piece of `name` (a parameter, buffer or optimizer state '<param>/<key>') lies in the
        full tensor: (full shape, offsets). Sharded checkpoints store each piece with it (no communication)."""
        shape = tuple(local_shape)
        return (shape, ()) if not shape else self.spec(name).placement(shape)

    def spec(self, name: str) -> ShardSpec:
        return self.specs.get(name.split("/", 1)[0], ShardSpec("replicated"))


def parallelize(
    model: nn.Module, grid: ProcessGrid, sequence_parallel: bool = False, grad_bucket_mb: int = 25,
    pipeline: PipelineOptions | None = None,
) -> ParallelPlan:
    specs: dict[str, ShardSpec]
    if grid.size("tp") > 1:
        specs = apply_tensor_parallel(model, grid.group("tp"), sequence_parallel)
    else:
        specs = {name: ShardSpec("replicated") for name, _ in model.named_parameters()}
    expert_names: frozenset[str] = frozenset()
    if grid.size("ep") > 1:
        expert_specs = apply_expert_parallel(model, grid.group("ep"))
        for name, ep_spec in expert_specs.items():  # under TP each expert is also split along its hidden size
            tp_spec = specs.get(name)
            split_by_tp = tp_spec is not None and tp_spec.kind != "replicated"
            specs[name] = dataclasses.replace(tp_spec, outer=ep_spec) if split_by_tp else ep_spec
        expert_names = frozenset(expert_specs)
    sp = sequence_parallel and grid.size("tp") > 1
    plan = ParallelPlan(grid, specs, sp, model.cfg.vocab_size, grad_bucket_mb * 2**20,
                        tied_embedding=last_stage_holds_embedding(model.cfg), expert_names=expert_names)
    if grid.size("cp") > 1:
        plan.context = ContextParallel(grid.group("cp"), grid.size("cp"), grid.coords["cp"])
        plan.context.apply(model)
    if grid.size("tp") > 1 or grid.size("cp") > 1:
        model.mtp_loss_function = plan.loss  # the MTP depths' logits are split over the vocabulary / sequence too
    if grid.size("pp") > 1:
        plan.pipeline, plan.not_counted = _pipeline(model, grid, pipeline or PipelineOptions(), sp)
        plan.local_names = {name for name, _ in model.named_parameters()}
        plan.specs = {name: spec for name, spec in specs.items() if name in plan.local_names}
    return plan


def _pipeline(model: nn.Module, grid: ProcessGrid, options: PipelineOptions, sp: bool):
    pp, pp_rank = grid.size("pp"), grid.coords["pp"]
    ranges = plan_stages(model.cfg, options.seq_len, pp, options.virtual_stages, options.layers)
    num_stages = len(ranges)
    stage_ids = stages_of_rank(pp_rank, pp, options.virtual_stages)
    has_first, has_last = 0 in stage_ids, num_stages - 1 in stage_ids
    seq_len = options.seq_len // grid.size("cp")  # the positions this rank computes of each window
    stages = [StageModule(model, ranges[s], s == 0, s == num_stages - 1, seq_len) for s in stage_ids]
    prune_model(model, {i for s in stage_ids for i in ranges[s]}, has_first, has_last)
    tokens = seq_len // grid.size("tp") if sp else seq_len
    from parallel.pipeline.runner import PipelineRunner  # torch.distributed.pipelining imports torch._dynamo (1.5 s)

    runner = PipelineRunner(
        stages, stage_ids, num_stages, grid.group("pp"), grid.group_ranks["pp"], options.schedule,
        options.n_microbatches, lambda batch: (batch, tokens, model.cfg.d_model),
    )
    # the embedding on the last stage is a copy of the first stage's: count it once
    tied_copy = last_stage_holds_embedding(model.cfg) and has_last and not has_first
    return runner, frozenset({"embed.weight"}) if tied_copy else frozenset()
