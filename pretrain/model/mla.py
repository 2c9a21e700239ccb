"""Multi-head Latent Attention (DeepSeek-V2/V3). Plain torch, no parallel code.

    queries: q = q_b_proj(RMSNorm(q_a_proj(x))) through a rank-`q_lora_rank` bottleneck (or one q_proj when
             q_lora_rank = 0), per head [qk_nope_head_dim | qk_rope_head_dim].
    keys and values: kv_a_proj_with_mqa(x) = [latent of kv_lora_rank | one rope key of qk_rope_head_dim shared
             by all heads]; kv_b_proj(RMSNorm(latent)) gives per head [k_nope of qk_nope_head_dim | v of
             v_head_dim]. Only the latent and the shared rope key would be cached at inference.
    RoPE:    on the rope parts only (the query's per head, the shared key broadcast to every head); the nope
             parts carry content only, so their scores do not depend on position.
    scores:  softmax((q_nope·k_nope + q_rope·k_rope) / sqrt(qk_nope + qk_rope)), causal (and sliding-window),
             over n_heads · v_head_dim values, then o_proj back to d_model.

Module names are Hugging Face DeepseekV3's, so export is a renaming table plus one step: our RoPE rotates halves (as
Llama stores q/k), DeepSeek's checkpoints rotate interleaved pairs (`rope_interleave`), so the rope rows of q_b_proj
(q_proj) and kv_a_proj_with_mqa need the usual pair permutation on export. Under YaRN with `mscale_all_dim`, the
softmax scale is multiplied by DeepSeek's mscale² (`softmax_multiplier`, from pretrain/model/rope.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.model.config import MLAConfig
from pretrain.model.kv_cache import LayerCache
from pretrain.model.rope import apply_rope, rope_slice
from pretrain.model.sdpa import causal_attention


def _norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm of a latent in fp32, back in its dtype: under bf16 autocast the latent is bf16 and the norm's weight
    fp32, which torch's fused RMSNorm does not take."""
    return norm(x.float()).to(x.dtype)


class MLA(nn.Module):
    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig, norm_eps: float = 1e-5, sliding_window: int = 0,
                 dropout: float = 0.0, softmax_multiplier: float = 1.0):
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.sliding_window = sliding_window
        self.dropout = dropout
        self.scale = softmax_multiplier / math.sqrt(cfg.qk_head_dim)
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n_heads * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * cfg.v_head_dim, d_model, bias=False)
        self.core_attention = causal_attention  # softmax(q·kᵀ)·v; context parallelism swaps in its own

    def input_projections(self) -> list[nn.Linear]:
        """The linears that read the block input or a latent (initialised with the plain std)."""
        queries = [self.q_a_proj, self.q_b_proj] if hasattr(self, "q_a_proj") else [self.q_proj]
        return [*queries, self.kv_a_proj_with_mqa, self.kv_b_proj]

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_a_proj"):
            return self.q_b_proj(_norm(self.q_a_layernorm, self.q_a_proj(x)))
        return self.q_proj(x)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0):
        """Per-head q, k [batch, heads, seq, qk_nope + qk_rope] (RoPE applied to the rope part) and v [batch, heads,
        seq, v_head_dim], for positions start .. start + seq - 1 (cos/sin from position 0)."""
        batch, seq = x.shape[0], x.shape[1]
        q = self.queries(x).view(batch, seq, -1, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(_norm(self.kv_a_layernorm, latent)).view(batch, seq, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        cos, sin = rope_slice(cos, sin, start, seq)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # [batch, 1, seq, rope]: one key for every head
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, q.shape[1], -1, -1)], dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin, cache.length if cache is not None else 0)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0
        out = self.core_attention(q, k, v, self.sliding_window, dropout, self.scale, allowed)
        return self.o_proj(out.transpose(1, 2).flatten(2))
