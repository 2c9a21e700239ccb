"""Causal (optionally sliding-window) scaled dot-product attention, shared by GQA and MLA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [seq, seq], True where attention is allowed: j <= i, and i - j < window when window > 0."""
    i = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = j <= i
    if window > 0:
        allowed &= (i - j) < window
    return allowed


def repeat_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with each head repeated for its group of query heads (GQA); unchanged when the counts match."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return k, v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int = 0,
                     dropout: float = 0.0, scale: float | None = None, allowed: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """q, k: [batch, heads, seq, qk_dim], v: [batch, heads, seq, v_dim] -> [batch, heads, seq, v_dim]; each
    position sees itself and the earlier ones (the last `sliding_window` of them when it is > 0), and with
    `allowed` ([batch, 1, seq, seq], e.g. same document) only those. With more keys than queries (a KV cache), the
    queries are the last positions. Fewer key/value heads than query heads (GQA): each serves a group of queries."""
    k, v = repeat_kv_heads(q, k, v)
    seq, keys = q.shape[2], k.shape[2]
    if allowed is not None:
        mask = causal_mask(seq, sliding_window, q.device) & allowed[..., :seq, :seq]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    if keys > seq:
        i = torch.arange(keys - seq, keys, device=q.device).unsqueeze(1)
        j = torch.arange(keys, device=q.device).unsqueeze(0)
        allowed = (j <= i) & ((i - j < sliding_window) if sliding_window > 0 else True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale)
    if 0 < sliding_window < seq:
        mask = causal_mask(seq, sliding_window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
