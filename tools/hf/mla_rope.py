"""MLA's rope rows between our rotate-half layout and DeepSeek's interleaved pairs (`rope_interleave: true`, the
layout of DeepSeek's published checkpoints and of transformers' DeepseekV3 default).

transformers de-interleaves the rope part of each query head and of the shared rope key before rotating halves
(rotary dims 0, 2, 4, … then 1, 3, 5, …), so the weight rows that produce them are stored interleaved: stored row
2i is our row i and stored row 2i+1 our row rope/2 + i. The rows are the last `qk_rope_head_dim` of every head of
the query projection (`q_proj` or `q_b_proj`) and the last `qk_rope_head_dim` of `kv_a_proj_with_mqa`.
"""

from __future__ import annotations

import torch

from pretrain.model.config import MLAConfig

QUERY = ("attn.q_proj.weight", "attn.q_b_proj.weight")
KEY = "attn.kv_a_proj_with_mqa.weight"


def _rope_rows(name: str, rows: int, mla: MLAConfig) -> torch.Tensor | None:
    """Indices of the rope rows of our tensor `name` (in our order), None for a tensor without any."""
    rope = mla.qk_rope_head_dim
    if name.endswith(QUERY):
        heads = rows // mla.qk_head_dim
        return torch.cat([h * mla.qk_head_dim + mla.qk_nope_head_dim + torch.arange(rope) for h in range(heads)])
    if name.endswith(KEY):
        return mla.kv_lora_rank + torch.arange(rope)
    return None


def _interleaving(rope: int) -> torch.Tensor:
    """order[2i] = i, order[2i + 1] = rope/2 + i: the stored (interleaved) row's index in our order."""
    return torch.arange(rope).view(2, rope // 2).t().reshape(-1)


def to_interleaved(name: str, weight: torch.Tensor, mla: MLAConfig) -> torch.Tensor:
    rows = _rope_rows(name, weight.shape[0], mla)
    if rows is None:
        return weight
    out = weight.clone()
    groups = rows.view(-1, mla.qk_rope_head_dim)
    out[groups.reshape(-1)] = weight[groups[:, _interleaving(mla.qk_rope_head_dim)].reshape(-1)]
    return out


def from_interleaved(name: str, weight: torch.Tensor, mla: MLAConfig) -> torch.Tensor:
    rows = _rope_rows(name, weight.shape[0], mla)
    if rows is None:
        return weight
    out = weight.clone()
    groups = rows.view(-1, mla.qk_rope_head_dim)
    out[groups[:, _interleaving(mla.qk_rope_head_dim)].reshape(-1)] = weight[groups.reshape(-1)]
    return out
