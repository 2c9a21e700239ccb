"""Mixture-of-Experts feed-forward layer, DeepSeek-V3 style. Plain torch, no parallel code.

    router:  scores = softmax or sigmoid of x·W_rᵀ (fp32); selection adds a per-expert bias (auxiliary-loss-free
             balancing: the bias only picks experts, it never weights them) and may first keep the best
             `topk_groups` of `n_groups` expert groups (group-limited routing); the top-k experts' unbiased
             scores are the weights, normalized to sum 1 when `norm_topk`, times `routed_scaling`.
    experts: fine-grained SwiGLU experts stored as [E, …] weights and computed as grouped matmuls over tokens
             sorted by expert; dropless by default, or each expert takes at most
             ceil(capacity_factor · tokens · k / E) tokens (in token order) and the rest are dropped.
    shared:  `n_shared` always-on experts, one SwiGLU MLP of n_shared × expert_hidden.
    losses:  optional sequence-level balance loss and router z-loss, attached to the layer output's gradient
             (`AuxLossInjector`), so they need no plumbing through the model or a pipeline.

The last forward's load statistics are kept on the layer (`last_stats`); `bias_update` applies the
auxiliary-loss-free update from the loads accumulated since the previous update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEConfig:
    num_experts: int = 0  # routed experts; 0: every layer is a dense MLP
    top_k: int = 2
    expert_hidden: int = 0  # 0: model ffn size / top_k (same active parameters as the dense MLP)
    num_shared_experts: int = 0
    first_k_dense: int = 0  # the first k layers keep a dense MLP (DeepSeek-V3: 3)
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = True
    routed_scaling: float = 1.0
    n_groups: int = 1  # group-limited routing: experts in n_groups groups, tokens use the best topk_groups
    topk_groups: int = 1
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing step (DeepSeek-V3: 0.001); 0: off
    aux_loss_weight: float = 0.0  # sequence-level balance loss weight (DeepSeek-V3: 1e-4)
    router_z_loss: float = 0.0
    capacity_factor: float = 0.0  # 0: dropless

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def hidden(self, dense_ffn: int) -> int:
        return self.expert_hidden if self.expert_hidden > 0 else max(1, dense_ffn // self.top_k)

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and index >= self.first_k_dense


# what `MoE.stats_since_update` sums, in order: dropped assignments, balance loss, router z-loss, forwards
SUMMED_STATS = ("dropped", "balance_loss", "router_z_loss", "forwards")


class AuxLossInjector(torch.autograd.Function):
    """Identity on `output` whose backward also sends `scale` as the gradient of `aux_loss`: the auxiliary loss
    joins the training loss wherever the output's gradient comes from (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


_TORCH_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """What grouped_mm computes, one matmul per group: 2-D a [rows, k] with 3-D b [G, k, n] -> [rows, n]; 2-D a
    [m, rows] with 2-D b [rows, n] -> [G, m, n] (the weight gradient)."""
    starts = [0, *ends.tolist()[:-1]]
    pieces = list(zip(starts, ends.tolist(), strict=True))
    if b.dim() == 3:
        out = a.new_zeros((a.shape[0], b.shape[-1]))
        for g, (start, end) in enumerate(pieces):
            out[start:end] = a[start:end] @ b[g]
        return out
    return torch.stack([a[:, start:end] @ b[start:end] for start, end in pieces])


def grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM where this torch build has one for the device, dtype and strides (some builds only for
    bf16 on recent GPUs; all need 16-byte aligned rows), else the same product as a loop over groups."""
    if _TORCH_GROUPED_MM is not None:
        try:
            return _TORCH_GROUPED_MM(a, b, offs=ends)
        except (RuntimeError, NotImplementedError):
            pass
    return _grouped_mm_loop(a, b, ends)


class GroupedLinear(torch.autograd.Function):
    """y[rows of group g] = x[rows of group g] @ w[g] for tokens sorted by group; `ends` are the cumulative row
    counts. One grouped GEMM (torch.nn.functional.grouped_mm) each for the output and both gradients."""

    @staticmethod
    def forward(ctx, x, weight, ends):
        ctx.save_for_backward(x, weight, ends)
        return grouped_mm(x, weight, ends)

    @staticmethod
    def backward(ctx, grad):
        x, weight, ends = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grouped_mm(grad, weight.transpose(1, 2), ends)
        grad_w = grouped_mm(x.t(), grad, ends)
        return grad_x, grad_w, None


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert: bincount with an output shape that does not depend on the ids (so torch.compile
    traces the dropless MoE layer as one graph; bincount's shape is data-dependent to it)."""
    return ids.new_zeros(num_experts).scatter_add_(0, ids, torch.ones_like(ids))


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast computes in (unchanged outside autocast): cast once, before tokens are copied k
    times (and, with expert parallelism, sent), instead of after."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x: [tokens sorted by expert, in]; weight: [E, in, out]; counts: tokens per expert."""
    if x.shape[0] == 0:  # still in the graph: expert parallelism needs every rank to run the same backward
        return x @ weight[0].to(x.dtype)
    ends = torch.cumsum(counts, 0).to(torch.int32)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # a custom op: autocast does not cast it, so do what it would
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    return GroupedLinear.apply(x.to(dtype).contiguous(), weight.to(dtype), ends)


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        # selection bias of auxiliary-loss-free balancing (a buffer: updated from loads, not by gradients)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()
        return logits, scores

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids and their weights per token, from [tokens, E] scores."""
        cfg = self.cfg
        biased = scores.detach() + self.expert_bias
        if cfg.n_groups > 1:
            grouped = biased.view(biased.shape[0], cfg.n_groups, -1)
            per_group = min(2, grouped.shape[-1])  # a group's score: its best two experts (DeepSeek-V3)
            group_score = grouped.topk(per_group, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(cfg.topk_groups, dim=-1).indices, True)
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(biased)
        ids = biased.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
        return ids, weights * cfg.routed_scaling


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights [E, in, out]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: tokens sorted by expert; counts: how many go to each expert."""
        return grouped_swiglu(x, self.gate, self.up, self.down, counts)


def grouped_swiglu(x, gate, up, down, counts: torch.Tensor) -> torch.Tensor:
    hidden = F.silu(grouped_linear(x, gate, counts)) * grouped_linear(x, up, counts)
    return grouped_linear(hidden, down, counts)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, d_model: int, dense_ffn: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden(dense_ffn)
        self.router = Router(d_model, cfg)
        self.experts = Experts(cfg.num_experts, d_model, hidden)
        self.shared = SwiGLU(d_model, hidden * cfg.num_shared_experts) if cfg.num_shared_experts else None
        self.aux_loss_scale = 1.0  # set by the trainer: the factor its main loss gets (1 / micro-batches)
        # A sequence split over `sequence_shards` ranks (context parallelism) sums its per-sequence statistics over
        # them with `sum_over_sequence` (swapped in by parallel/; its backward passes the gradient through)
        self.sequence_shards = 1
        self.sum_over_sequence = _unchanged
        self.collect_statistics = True  # off for forwards that are not training steps (shape inference)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.register_buffer("load_since_update", torch.zeros(cfg.num_experts), persistent=False)
        # sums since the last bias update, kept on the device (no host sync per forward)
        self.register_buffer("stats_since_update", torch.zeros(len(SUMMED_STATS)), persistent=False)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Experts' weighted outputs for flat tokens x [N, d] routed to ids/weights [N, k].

        Assignments (token n, slot j) are flattened to n·k + j, sorted by expert and computed. On a GPU they are put
        back in slot order and summed with their weights per token: no atomic scatter-add, so the result is
        deterministic there too; dropless routing needs no host synchronization. On a CPU, where scatter-adds are
        deterministic, tokens are gathered with index_select and the weighted outputs scatter-added per token: the
        GPU path's index_put/slot sum made the tiny MoE model's CPU step ~7% slower (fp32, AVX2)."""
        n_tokens, k = ids.shape
        flat_ids = ids.reshape(-1)
        if self.cfg.capacity_factor > 0:
            capacity = math.ceil(self.cfg.capacity_factor * n_tokens * k / self.cfg.num_experts)
            one_hot = F.one_hot(flat_ids, self.cfg.num_experts)
            position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of this assignment within its expert
            kept = position < capacity
            order = torch.argsort(flat_ids.masked_fill(~kept, self.cfg.num_experts), stable=True)[: int(kept.sum())]
            counts = torch.bincount(flat_ids[kept], minlength=self.cfg.num_experts)
            self.last_stats["dropped"] = (~kept).sum().detach()
        else:
            order = torch.argsort(flat_ids, stable=True)
            counts = expert_counts(flat_ids, self.cfg.num_experts)
            self.last_stats["dropped"] = torch.zeros((), dtype=torch.long, device=x.device)
        token_of = order // k
        if x.device.type == "cpu":  # scatter-adds are deterministic on a CPU, and the faster way there
            expert_out = self.experts(in_autocast_dtype(x).index_select(0, token_of), counts)
            weighted = expert_out * weights.reshape(-1)[order].unsqueeze(-1).to(expert_out.dtype)
            out = expert_out.new_zeros((n_tokens, expert_out.shape[-1])).index_add_(0, token_of, weighted)
            return out.to(x.dtype)
        expert_out = self.experts(in_autocast_dtype(x)[token_of], counts)
        per_slot = expert_out.new_zeros((n_tokens * k, expert_out.shape[-1]))  # dropped assignments stay zero
        per_slot[order] = expert_out
        out = (per_slot.view(n_tokens, k, -1) * weights.unsqueeze(-1).to(per_slot.dtype)).sum(1)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d = x.shape
        flat = x.reshape(-1, d)
        logits, scores, ids, weights = self.route(flat)
        out = self.experts_output(flat, ids, weights)
        return self.finish(out.view(batch, seq, d), logits, scores, ids, batch, seq)

    def route(self, flat: torch.Tensor):
        """Router logits and scores [N, E], and each token's top-k expert ids and weights [N, k]."""
        logits, scores = self.router.scores(flat)
        ids, weights = self.router.select(scores)
        return logits, scores, ids, weights

    def experts_output(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted outputs plus the shared experts', [N, d]."""
        out = self.dispatch(flat, ids, weights)
        return out + self.shared(flat) if self.shared is not None else out

    def finish(self, out: torch.Tensor, logits, scores, ids, batch: int, seq: int) -> torch.Tensor:
        """Records the load statistics of this forward and attaches the auxiliary losses to `out`'s gradient."""
        load = expert_counts(ids.reshape(-1), self.cfg.num_experts).float()
        counting = self.training and self.collect_statistics
        if counting:
            self.load_since_update += load
        self.last_stats.update(tokens_per_expert=load.detach(), imbalance=(load.max() / load.mean()).detach())
        aux = self._aux_loss(logits, scores, ids, batch, seq)
        if counting:
            zero = torch.zeros((), device=load.device)
            self.stats_since_update += torch.stack(
                [self.last_stats["dropped"].float(), self.last_stats.get("balance_loss", zero),
                 self.last_stats.get("router_z_loss", zero), torch.ones((), device=load.device)])
        if aux is not None and self.training and torch.is_grad_enabled():
            out = AuxLossInjector.apply(out, aux, self.aux_loss_scale)
        return out

    def _aux_loss(self, logits, scores, ids, batch: int, seq: int) -> torch.Tensor | None:
        cfg = self.cfg
        total = None
        if cfg.aux_loss_weight > 0:
            # DeepSeek-V3 sequence-wise balance loss: alpha * sum_i f_i * P_i, per sequence, averaged
            e = cfg.num_experts
            whole = seq * self.sequence_shards
            chosen = F.one_hot(ids, e).sum(1).view(batch, seq, e).float()
            f = self.sum_over_sequence(chosen.sum(1)) * e / (cfg.top_k * whole)
            normalized = scores / scores.sum(-1, keepdim=True)
            p = self.sum_over_sequence(normalized.view(batch, seq, e).sum(1)) / whole
            balance = (f * p).sum(-1).mean()
            self.last_stats["balance_loss"] = balance.detach()
            # every shard holds the whole loss, and the shards' gradients are averaged: each carries all of it
            total = cfg.aux_loss_weight * balance * self.sequence_shards
        if cfg.router_z_loss > 0:
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.last_stats["router_z_loss"] = z.detach()
            total = cfg.router_z_loss * z if total is None else total + cfg.router_z_loss * z
        return total

    @torch.no_grad()
    def bias_update(self, load: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones.
        `load`: tokens per expert since the last update (summed over data-parallel ranks by the caller);
        default this layer's own count."""
        load = self.load_since_update if load is None else load
        if self.cfg.bias_update_rate > 0 and load.sum() > 0:
            self.router.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()
        self.stats_since_update.zero_()

    def reset_buffers(self) -> None:
        """Balancing state as at construction: no selection bias, nothing counted."""
        self.router.expert_bias.zero_()
        self.load_since_update.zero_()
        self.stats_since_update.zero_()


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def moe_statistics_paused(module: nn.Module):
    """Forwards inside do not count toward the load statistics (e.g. a pipeline's metadata inference pass)."""
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for layer in layers:
        layer.collect_statistics = False
    try:
        yield
    finally:
        for layer in layers:
            layer.collect_statistics = True
