"""Turn the plain `pretrain.model.Transformer` into its tensor-parallel (and sequence-parallel) shard.

    embed            → VocabParallelEmbedding (vocab rows split)
    q/k/v_proj       → ColumnParallelLinear (split by heads; KV heads replicated when fewer than TP ranks)
    MLA              → q_b/kv_b column-parallel by heads, the down-projections replicated (see _shard_mla)
    o_proj           → RowParallelLinear
    gate/up_proj     → ColumnParallelLinear
    down_proj        → RowParallelLinear
    MoE layers       → TensorParallelMoE (parallel/tensor/moe.py): experts' hidden size split, router replicated
    MTP modules      → their blocks as above; the norm before the shared head enters the TP region; the
                       projection and the other norms are replicated (sequence-parallel like the block norms)
    lm_head          → ColumnParallelLinear over the vocabulary (tied: shares the embedding's shard)
    norms            → unchanged; with sequence parallelism they run on sequence shards and their grads
                       are summed over the tensor-parallel group. The norms feeding column-parallel layers
                       get a forward hook that enters the TP region once (all-gather with SP, else a
                       backward all-reduce) for all the projections reading their output, as Megatron's
                       fused QKV / gate-up layers do: 2 entries per block, not 5.

Every parameter gets a `ShardSpec` saying how its full tensor maps to this rank's shard, which checkpoints
use to gather a layout-free copy and to cut one back out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.tensor import comm
from parallel.tensor.layers import (
    ColumnParallelLinear,
    EnterTensorParallelRegion,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from parallel.tensor.moe import TensorParallelMoE, tensor_parallel_moe_specs
from pretrain.model.lora import LoRALinear
from pretrain.model.mla import MLA
from pretrain.model.moe import MoE


class TensorParallelError(ValueError):
    pass


@dataclass(frozen=True)
class ShardSpec:
    """How a full tensor relates to this rank's piece of it."""

    kind: str  # "replicated" | "rows" | "cols" | "kv_rows" | "split" (along `dim`)
    rank: int = 0
    world: int = 1
    # kv_rows: this rank holds KV head `kv_head` of `n_kv_heads`, each `head_dim` rows.
    kv_head: int = 0
    n_kv_heads: int = 1
    head_dim: int = 1
    # Sequence-parallel norm weights: grads are partial sums over sequence shards.
    sequence_parallel: bool = False
    # A replicated weight whose output feeds only this rank's heads (MLA's down-projections): its grad is a partial
    # sum over the tensor-parallel ranks, with or without sequence parallelism.
    partial_grad: bool = False
    # The grid group the tensor is split over: "tp", or "ep" for expert weights.
    group: str = "tp"
    dim: int = 0  # "split": the dimension cut into `world` equal pieces (rows: 0, cols: 1)
    # A second cut, over another group, made before this one (an expert weight: experts over "ep", then each
    # expert's hidden size over "tp"): the full tensor is cut by `outer` first, that piece by this spec.
    outer: ShardSpec | None = None

    @property
    def split_dim(self) -> int | None:
        return {"rows": 0, "cols": 1, "split": self.dim}.get(self.kind)

    @property
    def counted_once(self) -> bool:
        """Whether this rank's copy counts toward the global grad norm (each element exactly once)."""
        if self.kind == "replicated":
            return self.rank == 0
        if self.kind == "kv_rows":
            return self.rank == first_rank_with_kv_head(self.kv_head, self.n_kv_heads, self.world)
        return True

    def placement(self, local_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where this rank's piece of `local_shape` lies in the full tensor: (full shape, offsets of the piece).
        The inverse of `shard_of`, without the full tensor; sharded checkpoints record it with every piece."""
        whole, offsets = list(local_shape), [0] * len(local_shape)
        if self.split_dim is not None:
            whole[self.split_dim] = local_shape[self.split_dim] * self.world
            offsets[self.split_dim] = local_shape[self.split_dim] * self.rank
        elif self.kind == "kv_rows":
            whole[0] = self.n_kv_heads * self.head_dim
            offsets[0] = self.kv_head * self.head_dim
        if self.outer is None:
            return tuple(whole), tuple(offsets)
        outer_whole, outer_offsets = self.outer.placement(tuple(whole))
        return outer_whole, tuple(a + b for a, b in zip(outer_offsets, offsets, strict=True))


def kv_head_of_rank(rank: int, n_kv_heads: int, world: int) -> int:
    return rank * n_kv_heads // world


def first_rank_with_kv_head(kv_head: int, n_kv_heads: int, world: int) -> int:
    return min(r for r in range(world) if kv_head_of_rank(r, n_kv_heads, world) == kv_head)


def check_divisibility(n_heads: int, n_kv_heads: int, vocab_size: int, d_model: int, ffn_dim: int, tp: int) -> None:
    problems = []
    if n_heads % tp:
        problems.append(f"model.n_heads={n_heads}")
    if n_kv_heads % tp and tp % n_kv_heads:
        problems.append(f"model.n_kv_heads={n_kv_heads} (must divide or be divisible by tp)")
    if vocab_size % tp:
        problems.append(f"model.vocab_size={vocab_size}")
    if ffn_dim % tp:
        problems.append(f"ffn hidden size {ffn_dim}")
    if d_model % tp:
        problems.append(f"model.d_model={d_model}")
    if problems:
        raise TensorParallelError(f"parallel.tp={tp} does not divide: " + ", ".join(problems))


def _kv_projection(linear: nn.Linear, n_kv_heads: int, head_dim: int, group, sequence_parallel: bool):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if n_kv_heads % world == 0:
        shard = ColumnParallelLinear.from_linear(linear, group, sequence_parallel, enters_region=False)
        return shard, ShardSpec("rows", rank, world)
    kv = kv_head_of_rank(rank, n_kv_heads, world)
    head = slice(kv * head_dim, (kv + 1) * head_dim)
    spec = ShardSpec("kv_rows", rank, world, kv_head=kv, n_kv_heads=n_kv_heads, head_dim=head_dim)
    layer = ColumnParallelLinear(linear.weight.detach()[head].clone(), group, sequence_parallel, enters_region=False)
    if isinstance(linear, LoRALinear):
        layer.attach_adapter(linear, linear.lora_a, linear.lora_b[head])
    return layer, spec


def adapter_specs(model: nn.Module, specs: dict[str, ShardSpec], rank: int, world: int) -> dict[str, ShardSpec]:
    """The LoRA adapters' specs, from their layer's: a column-parallel layer's A is whole (its gradient a partial sum
    over the ranks' output rows) and its B cut like the weight's rows; a row-parallel layer's A is cut by columns and
    its B whole (a partial sum again); a layer left whole keeps its weight's spec for both."""
    partial = ShardSpec("replicated", rank, world, partial_grad=True)
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "lora_a", None) is None:
            continue
        weight = specs[f"{name}.weight"]
        if isinstance(module, ColumnParallelLinear):
            out |= {f"{name}.lora_a": partial, f"{name}.lora_b": weight}
        elif isinstance(module, RowParallelLinear):
            out |= {f"{name}.lora_a": ShardSpec("cols", rank, world), f"{name}.lora_b": partial}
        else:
            out |= {f"{name}.lora_a": weight, f"{name}.lora_b": weight}
    return out


def apply_tensor_parallel(model: nn.Module, group, sequence_parallel: bool = False) -> dict[str, ShardSpec]:
    """Swaps the model's modules for their shards in place; returns the spec of every parameter by name."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.cfg
    check_divisibility(cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.d_model, cfg.ffn_dim, world)
    if cfg.moe.enabled and cfg.moe.hidden(cfg.ffn_dim) % world:
        raise TensorParallelError(f"parallel.tp={world} does not divide the expert hidden size "
                                  f"{cfg.moe.hidden(cfg.ffn_dim)} (model.moe.expert_hidden)")
    if sequence_parallel and cfg.dropout > 0:
        raise TensorParallelError("sequence parallelism with dropout needs per-rank RNG streams; set model.dropout=0")
    specs: dict[str, ShardSpec] = {}
    rows, cols = ShardSpec("rows", rank, world), ShardSpec("cols", rank, world)

    tied = cfg.tie_embeddings
    model.embed = VocabParallelEmbedding.from_embedding(model.embed, group, sequence_parallel)
    specs["embed.weight"] = rows
    entry = EnterTensorParallelRegion(group, sequence_parallel)
    column = lambda linear: ColumnParallelLinear.from_linear(  # noqa: E731
        linear, group, sequence_parallel, enters_region=False
    )
    blocks = {f"layers.{i}": block for i, block in enumerate(model.layers)}
    blocks |= {f"mtp.{k}.block": module.block for k, module in enumerate(model.mtp)}
    for p, block in blocks.items():
        attn, mlp = block.attn, block.mlp
        block.attn_norm.register_forward_hook(entry)
        if isinstance(attn, MLA):
            specs.update(_shard_mla(attn, p, column, RowParallelLinear.from_linear(attn.o_proj, group,
                                                                                    sequence_parallel), rank, world))
        else:
            attn.q_proj = column(attn.q_proj)
            attn.k_proj, k_spec = _kv_projection(attn.k_proj, cfg.n_kv_heads, cfg.head_dim, group, sequence_parallel)
            attn.v_proj, v_spec = _kv_projection(attn.v_proj, cfg.n_kv_heads, cfg.head_dim, group, sequence_parallel)
            attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group, sequence_parallel)
            specs.update({
                f"{p}.attn.q_proj.weight": rows, f"{p}.attn.k_proj.weight": k_spec, f"{p}.attn.v_proj.weight": v_spec,
                f"{p}.attn.o_proj.weight": cols,
            })
        if isinstance(mlp, MoE):  # enters and leaves the TP region itself (the router stays outside it)
            block.mlp = TensorParallelMoE(mlp, group, sequence_parallel)
            specs.update(tensor_parallel_moe_specs(f"{p}.mlp", rank, world, ShardSpec))
            continue
        block.mlp_norm.register_forward_hook(entry)
        mlp.gate_proj = column(mlp.gate_proj)
        mlp.up_proj = column(mlp.up_proj)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group, sequence_parallel)
        specs.update({
            f"{p}.mlp.gate_proj.weight": rows, f"{p}.mlp.up_proj.weight": rows, f"{p}.mlp.down_proj.weight": cols,
        })
    for module in model.mtp:  # the norm before the shared (column-parallel) head
        module.norm.register_forward_hook(entry)
    model.norm.register_forward_hook(entry)
    lm_head = column(model.lm_head)
    if tied:
        lm_head.weight = model.embed.weight
    else:
        specs["lm_head.weight"] = rows
    model.lm_head = lm_head

    replicated = ShardSpec("replicated", rank, world, sequence_parallel=sequence_parallel)
    names = {name for name, _ in model.named_parameters()}
    specs = {name: spec for name, spec in specs.items() if name in names}
    specs |= adapter_specs(model, {name: specs.get(name, replicated) for name in names}, rank, world)
    specs = {name: spec for name, spec in specs.items() if name in names}
    for name in names:
        specs.setdefault(name, replicated)
    return specs


def _shard_mla(attn: MLA, prefix: str, column, o_proj: nn.Module, rank: int, world: int) -> dict[str, ShardSpec]:
    """MLA split by heads (as Megatron does): the up-projections q_b_proj (or q_proj) and kv_b_proj are
    column-parallel, o_proj row-parallel; the down-projections (q_a_proj, kv_a_proj_with_mqa, whose output also
    carries the rope key every head shares) and the latent norms run replicated on the gathered input, and as
    each rank's heads use their output, their grads are partial sums completed over the TP group."""
    rows, cols = ShardSpec("rows", rank, world), ShardSpec("cols", rank, world)
    partial = ShardSpec("replicated", rank, world, partial_grad=True)
    a = f"{prefix}.attn"
    specs = {f"{a}.kv_a_proj_with_mqa.weight": partial, f"{a}.kv_a_layernorm.weight": partial,
             f"{a}.kv_b_proj.weight": rows, f"{a}.o_proj.weight": cols}
    attn.kv_b_proj = column(attn.kv_b_proj)
    if hasattr(attn, "q_a_proj"):
        attn.q_b_proj = column(attn.q_b_proj)
        specs |= {f"{a}.q_a_proj.weight": partial, f"{a}.q_a_layernorm.weight": partial, f"{a}.q_b_proj.weight": rows}
    else:
        attn.q_proj = column(attn.q_proj)
        specs[f"{a}.q_proj.weight"] = rows
    attn.o_proj = o_proj
    return specs


def _needs_tensor_parallel_sync(spec: ShardSpec) -> bool:
    return (spec.kind == "replicated" and (spec.sequence_parallel or spec.partial_grad)) or spec.kind == "kv_rows"


def _complete_grad(grad: torch.Tensor, spec: ShardSpec, group) -> torch.Tensor:
    """The full gradient of a parameter of which every TP rank holds only a partial gradient."""
    if spec.kind == "replicated":  # sequence-parallel norm: partial sums over sequence shards
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad
    # a replicated KV head: sum over the ranks sharing it, through a buffer holding every head
    rows = slice(spec.kv_head * spec.head_dim, (spec.kv_head + 1) * spec.head_dim)
    full = torch.zeros((spec.n_kv_heads * spec.head_dim, grad.shape[1]), dtype=grad.dtype, device=grad.device)
    full[rows] = grad
    dist.all_reduce(full, group=group)
    return full[rows].clone()


def sync_tensor_parallel_grads(model: nn.Module, specs: dict[str, ShardSpec], group) -> None:
    """Completes the grads that a rank only holds part of: sequence-parallel norms and replicated KV heads."""
    for name, p in model.named_parameters():
        if p.grad is not None and _needs_tensor_parallel_sync(specs[name]):
            p.grad.copy_(_complete_grad(p.grad, specs[name], group))


def register_tensor_parallel_grad_hooks(model: nn.Module, specs: dict[str, ShardSpec], group) -> int:
    """The same completion, done in backward as each gradient is produced (for engines such as DeepSpeed ZeRO
    that reduce and partition gradients before control returns to the training loop). Every TP rank runs the
    same backward graph, so the hooks' collectives line up. Returns how many parameters got a hook."""
    count = 0
    for name, p in model.named_parameters():
        spec = specs[name]
        if _needs_tensor_parallel_sync(spec):
            p.register_hook(lambda grad, spec=spec: _complete_grad(grad, spec, group))
            count += 1
    return count


def gather_full(tensor: torch.Tensor, spec: ShardSpec, group) -> torch.Tensor:
    """The full tensor from every rank's shard (collective: all TP ranks must call it)."""
    if spec.kind == "replicated" or group is None:
        return tensor.detach().clone()
    if spec.split_dim is not None:
        return comm.all_gather(tensor.detach(), spec.split_dim, group)
    rows = spec.head_dim
    full = torch.zeros((spec.n_kv_heads * rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    if spec.rank == first_rank_with_kv_head(spec.kv_head, spec.n_kv_heads, spec.world):
        full[spec.kv_head * rows : (spec.kv_head + 1) * rows] = tensor.detach()
    dist.all_reduce(full, group=group)
    return full


def shard_of(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's piece of a full tensor (no communication)."""
    if spec.kind == "replicated":
        return full
    if spec.split_dim is not None:
        return full.chunk(spec.world, dim=spec.split_dim)[spec.rank]
    return full[spec.kv_head * spec.head_dim : (spec.kv_head + 1) * spec.head_dim]
