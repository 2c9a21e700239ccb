"""Multi-token prediction (DeepSeek-V3): D sequential modules after the main model, each predicting one token
further ahead with the main model's embedding and output head. Plain torch, no parallel code.

Depth k (1..D) at position i combines the previous depth's hidden state h_{k-1}[i] (depth 0: the main model's
last hidden state) with the embedding of token x[i+k]: RMSNorm both, concatenate, project 2d -> d, run one
transformer block, and predict x[i+k+1]. With labels y[i] = x[i+1], depth k has targets at positions i < T-k:
inputs y[k-1 : T-1] and targets y[k : T]. They are kept at the full length T (the inputs padded with token 0, the
targets with the ignore index) so that every depth's positions line up with the main model's: a sequence shard
(sequence parallelism) holds the same positions at every depth, and causal attention keeps the padding out of
the positions that count.
"""

from __future__ import annotations

import torch
from torch import nn


def mtp_inputs_and_targets(
    labels: torch.Tensor, depth: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens to embed (x[i+k]) and targets (x[i+k+1]) of depth k at every position i < T; positions i >= T - k
    have no target (ignore_index). Ignored labels are embedded as token 0; they stay ignored as targets."""
    seq = labels.shape[1]
    tokens = torch.zeros_like(labels)
    tokens[:, : seq - depth] = labels[:, depth - 1 : seq - 1].clamp(min=0)
    targets = torch.full_like(labels, ignore_index)
    targets[:, : seq - depth] = labels[:, depth:]
    return tokens, targets


class MTPModule(nn.Module):
    def __init__(self, d_model: int, norm_eps: float, block: nn.Module):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.embed_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)  # before the shared output head

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor, cos, sin, cache=None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """`cache` (inference): the block's KV cache, the inputs being the positions after the cached ones."""
        seq = token_embedding.shape[1]
        h = torch.cat([self.hidden_norm(hidden[:, :seq]), self.embed_norm(token_embedding)], dim=-1)
        h = self.proj(h).to(hidden.dtype)  # the residual stream keeps the model's dtype
        return self.block(h, cos, sin, cache, allowed)
