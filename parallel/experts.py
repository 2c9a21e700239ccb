"""Expert parallelism: each rank of an expert-parallel group holds E/ep of every MoE layer's experts, and tokens
travel to the rank holding their expert and back by all-to-all (uneven splits). Applied from outside the model:
`apply_expert_parallel` swaps each MoE layer's `Experts` for `ExpertParallelExperts`, which has the same
interface (tokens sorted by expert in, their outputs out), so routing, weighting and the losses stay in the
plain model.

A layer's shared experts are computed while its dispatch all-to-all is in flight (`_overlapped_experts_output`:
the layer's `experts_output` is swapped from here, like its experts; the model computes the same sum).

The expert-parallel group is carved from data-parallel ranks (parallel/grid.py), so its ranks route different
tokens. An expert's gradient collects every EP rank's tokens through the all-to-all's backward; the ranks that
hold the same experts (the expert-data-parallel group) then sum theirs, and the sum is divided by the whole
data-parallel size, as the dense gradients are averaged over it.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from parallel.tensor.apply import ShardSpec
from pretrain.model.moe import Experts, MoE, grouped_swiglu


class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks by `send` counts; rows arrive by `recv` counts. Backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return back, None, None, None


class _StartAllToAll(torch.autograd.Function):
    """`_AllToAll`'s forward started asynchronously: the rows arrive in the returned tensor once `_WaitAllToAll`
    (given the same `pending` list) has waited for them. Backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group, pending: list):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        sent = x.contiguous()  # held until the wait: the exchange reads it in the background
        pending.append((dist.all_to_all_single(out, sent, output_split_sizes=recv, input_split_sizes=send,
                                               group=group, async_op=True), sent))
        return out

    @staticmethod
    def backward(ctx, grad):
        return *_AllToAll.backward(ctx, grad), None


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, received, pending: list):
        work, _ = pending.pop()
        work.wait()
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ExpertParallelExperts(nn.Module):
    """This rank's E/ep experts, fed by all-to-all over the expert-parallel group."""

    def __init__(self, experts: Experts, group, num_experts: int):
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.local = num_experts // self.ep
        mine = slice(self.ep_rank * self.local, (self.ep_rank + 1) * self.local)
        self.gate = nn.Parameter(experts.gate.detach()[mine].clone())
        self.up = nn.Parameter(experts.up.detach()[mine].clone())
        self.down = nn.Parameter(experts.down.detach()[mine].clone())
        self.meanwhile = None  # work to do while the dispatched tokens travel (set for one forward)
        self.dispatching = False  # True while `meanwhile` runs with the dispatch all-to-all in flight

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: this rank's tokens sorted by (global) expert; counts: how many per expert (length E)."""
        per_dest = counts.view(self.ep, self.local)  # [destination rank, its local expert]
        arriving = torch.empty_like(per_dest)
        dist.all_to_all_single(arriving, per_dest.contiguous(), group=self.group)  # [source rank, local expert]
        # the split sizes go to the host once per layer (the all-to-all needs them there), and only once
        send, recv = torch.stack([per_dest.sum(1), arriving.sum(1)]).tolist()
        pending: list = []
        received = _StartAllToAll.apply(x, send, recv, self.group, pending)
        if self.meanwhile is not None:
            meanwhile, self.meanwhile, self.dispatching = self.meanwhile, None, True
            try:
                meanwhile()
            finally:
                self.dispatching = False
        received = _WaitAllToAll.apply(received, pending)
        # arrived grouped by source rank, then expert: regroup by expert for one grouped matmul
        expert_of_row = torch.arange(self.local, device=x.device).repeat(self.ep).repeat_interleave(
            arriving.flatten(), output_size=sum(recv))
        order = torch.argsort(expert_of_row, stable=True)
        out_sorted = grouped_swiglu(received[order], self.gate, self.up, self.down, arriving.sum(0))
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return _AllToAll.apply(out, recv, send, self.group)


def _overlapped_experts_output(layer: MoE, flat: torch.Tensor, ids: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """`MoE.experts_output` (the routed experts' weighted outputs plus the shared experts'), with the shared experts
    computed while the dispatch all-to-all is in flight."""
    shared = []
    layer.experts.meanwhile = lambda: shared.append(layer.shared(flat))
    out = layer.dispatch(flat, ids, weights)
    return out + shared[0]


def apply_expert_parallel(model: nn.Module, group) -> dict[str, ShardSpec]:
    """Swap every MoE layer's experts for this rank's share; returns the shard specs of the expert weights
    (rows of the expert dimension, over the expert-parallel group)."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    specs = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.experts = ExpertParallelExperts(module.experts, group, module.cfg.num_experts)
            if module.shared is not None:
                module.experts_output = functools.partial(_overlapped_experts_output, module)
            for weight in ("gate", "up", "down"):
                specs[f"{name}.experts.{weight}"] = ShardSpec("rows", rank=rank, world=ep, group="ep")
    return specs
