"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full vocabulary on one rank.

Each rank holds logits for its vocabulary slice [B, T, V/tp]. Only per-token scalars cross ranks: the max,
the sum of exponentials, the target's logit and (for label smoothing) the sum of logits. The result equals
`pretrain.model.loss.lm_loss` on the full logits: same label smoothing, z-loss and ignore_index semantics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.tensor import comm


def _lse_and_target_logit(logits: torch.Tensor, labels: torch.Tensor, group, vocab_start: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: log-sum-exp over the whole vocabulary, and the target's logit (0 for labels outside it)."""
    local_vocab = logits.shape[-1]
    with torch.no_grad():
        global_max = logits.max(dim=-1).values
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - global_max.unsqueeze(-1)
    sum_exp = comm.reduce_from_tp(shifted.exp().sum(dim=-1), group)
    lse = sum_exp.log() + global_max

    local_target = labels - vocab_start
    here = (local_target >= 0) & (local_target < local_vocab)
    picked = logits.gather(-1, local_target.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    return lse, comm.reduce_from_tp(picked * here, group)


def vocab_parallel_token_logprobs(local_logits: torch.Tensor, labels: torch.Tensor, group, vocab_start: int,
                                  ignore_index: int = -100) -> torch.Tensor:
    """[B, T] fp32: log p(label) at every position (0 where the label is `ignore_index`), as
    `-F.cross_entropy(..., reduction="none")` gives on the full logits (DPO sums them per reply)."""
    lse, target_logit = _lse_and_target_logit(local_logits.float(), labels, group, vocab_start)
    return (target_logit - lse).masked_fill(labels == ignore_index, 0.0)


def vocab_parallel_lm_loss(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    group,
    vocab_start: int,
    vocab_size: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = local_logits.float()
    lse, target_logit = _lse_and_target_logit(logits, labels, group, vocab_start)
    valid = labels != ignore_index
    count = valid.sum().clamp(min=1)
    per_token_ce = lse - target_logit
    ce = (per_token_ce * valid).sum() / count
    loss = ce
    if label_smoothing > 0:
        mean_logit = comm.reduce_from_tp(logits.sum(dim=-1), group) / vocab_size
        smooth = ((lse - mean_logit) * valid).sum() / count
        loss = (1.0 - label_smoothing) * ce + label_smoothing * smooth
    metrics = {"ce": ce.detach()}
    if z_loss > 0:
        z = (lse.pow(2) * valid).sum() / count
        loss = loss + z_loss * z
        metrics["z_loss"] = z.detach()
    return loss, metrics
