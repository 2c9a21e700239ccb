"""Context parallelism: every window's sequence split over the CP ranks, attention over all of it.

    split      load-balanced for causal attention: the window is cut into 2·CP chunks and rank r keeps chunks r and
               2·CP−1−r, so every rank has as many early (cheap) as late (expensive) queries (Megatron, Llama 3).
               Token ids and labels are split as they arrive; document ids stay whole (they say which keys a
               query may see).
    attention  each rank's queries against the whole window's keys and values: K and V are all-gathered over the
               CP group before the softmax (backward: reduce-scatter of their gradients) and the mask is built
               from the true positions of the local queries and all keys (causality, sliding window, documents).
               All-gather rather than a ring of K/V exchanges, as Llama 3 chose: K/V of GQA are a fraction of Q,
               the same bytes travel either way (a ring only overlaps them with compute, which gloo cannot), and
               any mask (document masking) is one boolean tensor instead of a per-step case analysis.
    RoPE       cos/sin at each local token's true position (or its position in its document).
    losses     the LM and MTP losses are sums over the local tokens divided by the whole window's count, times
               CP (the shards' gradients are averaged over DP×CP, like data-parallel ones); MTP shifts its labels
               across shard boundaries from the all-gathered labels; MoE sums its per-sequence balance statistics
               over the CP group.

Everything here is applied to a plain model from outside, by swapping the hooks the model exposes
(`attention_inputs`, each attention's `core_attention`, `mtp_shift`, MoE's `sum_over_sequence`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from parallel.tensor import comm
from pretrain.model.documents import Documents, positions_in_document
from pretrain.model.moe import MoE
from pretrain.model.mtp import mtp_inputs_and_targets
from pretrain.model.sdpa import repeat_kv_heads


class ContextParallelError(ValueError):
    """A window that cannot be split over the context-parallel ranks."""


def shard_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The true positions (in the whole window) of the `seq_len / cp` tokens rank `rank` holds, in its order."""
    if seq_len % (2 * cp):
        raise ContextParallelError(f"a window of {seq_len} tokens cannot be split into 2 x cp = {2 * cp} equal chunks")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def gathered_order(seq_len: int, cp: int, device=None) -> torch.Tensor:
    """Where each true position lies in the concatenation of every rank's shard (rank order)."""
    held = torch.cat([shard_positions(seq_len, cp, r, device) for r in range(cp)])
    return torch.argsort(held)


class _GatherShards(torch.autograd.Function):
    """All-gather of sequence shards along `dim` into true position order; backward: reduce-scatter of the
    gradient (every rank's queries used every key)."""

    @staticmethod
    def forward(ctx, x, dim: int, group, cp: int):
        ctx.dim, ctx.group, ctx.cp = dim, group, cp
        gathered = comm.all_gather(x, dim, group)
        order = gathered_order(gathered.shape[dim], cp, x.device)
        ctx.save_for_backward(order)
        return gathered.index_select(dim, order)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        in_rank_order = torch.empty_like(grad).index_copy_(ctx.dim, order, grad)
        return comm.reduce_scatter(in_rank_order, ctx.dim, ctx.group), None, None, None


def gather_shards(x: torch.Tensor, dim: int, group, cp: int) -> torch.Tensor:
    return _GatherShards.apply(x, dim, group, cp)


def _lower_right_causal(queries: int, keys: int, device):
    """The last `queries` positions of `keys` seeing each key up to their own: torch's `causal_lower_right` (no
    materialized mask; GPU kernels handle it natively), or the same boolean mask under a dispatch mode (e.g. the
    communication counter), where torch cannot create that tensor subclass."""
    if _get_current_dispatch_mode() is None:
        from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo: 1.5 s a process, CP only

        return causal_lower_right(queries, keys)
    i = torch.arange(keys - queries, keys, device=device).unsqueeze(1)
    return torch.arange(keys, device=device).unsqueeze(0) <= i


class CausalChunks:
    """The mask of plain causal attention on a load-balanced shard, without materializing it: the rank's two
    chunks of `chunk` queries end at true positions `ends` and each sees every key before its end, causally
    (lower-right aligned). Attention then runs per chunk on the keys up to its end: no [local, window] mask, and
    on GPUs the flash / memory-efficient kernels (torch's `causal_lower_right`)."""

    def __init__(self, chunk: int, ends: tuple[int, int]):
        self.chunk, self.ends = chunk, ends


class ContextParallel:
    """This rank's part of a context-parallel group; applied to a model by `apply`."""

    def __init__(self, group, cp: int, rank: int):
        self.group, self.cp, self.rank = group, cp, rank

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        return shard_positions(seq_len, self.cp, self.rank, device)

    def split_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tokens of every window: token ids and labels split, document ids kept whole."""
        out = dict(batch)
        for name in ("input_ids", "labels"):
            if name in batch:
                out[name] = batch[name].index_select(1, self.positions(batch[name].shape[1], batch[name].device))
        return out

    def whole(self, local: torch.Tensor) -> torch.Tensor:
        """[batch, local positions] from every rank -> [batch, window] in true order (no gradient)."""
        return gather_shards(local.detach(), 1, self.group, self.cp)

    def loss_share(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """CP × (this rank's counted tokens / the whole window's): turns the mean over this rank's tokens into its
        part of the mean over the whole window, scaled for gradients averaged over the CP ranks."""
        counts = (labels != ignore_index).sum().to(torch.float32).reshape(1)
        local = counts.clone()
        dist.all_reduce(counts, group=self.group)
        return self.cp * local[0] / counts[0].clamp(min=1)

    def attention_inputs(self, model: nn.Module):
        """The model's `attention_inputs` for local windows: cos/sin at the true positions, and the mask of which
        of the whole window's keys each local query sees."""
        rope = model.rope
        sliding_window = model.cfg.sliding_window

        def attention_inputs(local_len: int, documents: Documents | None = None):
            seq_len = local_len * self.cp
            cos, sin = rope(seq_len)
            queries = self.positions(seq_len, cos.device)
            if documents is None and sliding_window == 0:
                chunk = local_len // 2  # the chunks of shard_positions: r and 2·cp−1−r
                ends = ((self.rank + 1) * chunk, (2 * self.cp - self.rank) * chunk)
                return cos[queries], sin[queries], CausalChunks(chunk, ends)
            keys = torch.arange(seq_len, device=cos.device)
            allowed = keys.unsqueeze(0) <= queries.unsqueeze(1)
            if sliding_window > 0:
                allowed &= (queries.unsqueeze(1) - keys.unsqueeze(0)) < sliding_window
            if documents is None:
                return cos[queries], sin[queries], allowed
            ids = documents.ids  # whole windows
            if documents.positions is not None:
                in_document = positions_in_document(ids)[:, queries]
                cos, sin = cos[in_document], sin[in_document]
            else:
                cos, sin = cos[queries], sin[queries]
            same = ids[:, queries].unsqueeze(-1) == ids.unsqueeze(-2)
            return cos, sin, (allowed & same).unsqueeze(1)

        return attention_inputs

    def core_attention(self, q, k, v, sliding_window: int = 0, dropout: float = 0.0, scale: float | None = None,
                       allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Local queries against the whole window's keys and values; `allowed` from `attention_inputs` (causality and
        the sliding window included)."""
        chunked = isinstance(allowed, CausalChunks)
        if not chunked and (allowed is None or allowed.shape[-1] != q.shape[2] * self.cp):
            raise ContextParallelError("context-parallel attention needs the mask of its model's attention_inputs "
                                       "(a KV cache is not supported)")
        k, v = gather_shards(k, 2, self.group, self.cp), gather_shards(v, 2, self.group, self.cp)
        k, v = repeat_kv_heads(q, k, v)  # GQA: gathered before the repeat, so only the KV heads travel
        if not chunked:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale)
        outputs = []
        for queries, end in zip(q.split(allowed.chunk, dim=2), allowed.ends, strict=True):
            mask = _lower_right_causal(queries.shape[2], end, q.device)
            outputs.append(F.scaled_dot_product_attention(queries, k[:, :, :end], v[:, :, :end], attn_mask=mask,
                                                          dropout_p=dropout, scale=scale))
        return torch.cat(outputs, dim=2)

    def mtp_shift(self, labels: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, targets = mtp_inputs_and_targets(self.whole(labels), depth)
        positions = self.positions(tokens.shape[1], tokens.device)
        return tokens[:, positions], targets[:, positions]

    def sum_over_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return comm.reduce_from_tp(x, self.group)

    def apply(self, model: nn.Module) -> None:
        model.attention_inputs = self.attention_inputs(model)
        model.mtp_shift = self.mtp_shift
        for module in model.modules():
            if hasattr(module, "core_attention"):
                module.core_attention = self.core_attention
            if isinstance(module, MoE):
                module.sequence_shards = self.cp
                module.sum_over_sequence = self.sum_over_sequence
