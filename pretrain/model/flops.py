"""Parameter counts and training FLOPs per token, for MFU and cost estimates."""

from __future__ import annotations

from pretrain.model.config import ModelConfig


def attention_matmul_parameters(cfg: ModelConfig) -> int:
    """The attention's projection weights (every one takes part in a matmul per token)."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention != "mla":
        return d * cfg.head_dim * (2 * h + 2 * cfg.n_kv_heads)
    m = cfg.mla
    q = d * m.q_lora_rank + m.q_lora_rank * h * m.qk_head_dim if m.q_lora_rank > 0 else d * h * m.qk_head_dim
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + h * m.v_head_dim * d


def attention_parameters(cfg: ModelConfig) -> int:
    """All of the attention's weights: the projections, and MLA's RMSNorms of the query and KV latents."""
    norms = cfg.mla.q_lora_rank + cfg.mla.kv_lora_rank if cfg.attention == "mla" else 0
    return attention_matmul_parameters(cfg) + norms


def attention_score_flops(cfg: ModelConfig, context: float) -> float:
    """Forward FLOPs per token and layer of QK^T and AV over `context` keys: 2 * n_heads * (qk dim + v dim) * context
    (GQA: both dims are head_dim; MLA: qk_nope + qk_rope, and v_head_dim)."""
    if cfg.attention == "mla":
        qk, v = cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    else:
        qk = v = cfg.head_dim
    return 2 * cfg.n_heads * (qk + v) * context


def mlp_parameters(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """The feed-forward's weights in layer `layer`; `active`: only those one token uses (router, its top-k
    routed experts and the shared experts)."""
    moe = cfg.moe
    if not moe.is_moe_layer(layer):
        return 3 * cfg.d_model * cfg.ffn_dim
    expert = 3 * cfg.d_model * moe.hidden(cfg.ffn_dim)
    routed = (moe.top_k if active else moe.num_experts) * expert
    return moe.num_experts * cfg.d_model + routed + moe.num_shared_experts * expert


def block_parameters(cfg: ModelConfig, layer: int = 0, active: bool = False) -> int:
    return attention_parameters(cfg) + mlp_parameters(cfg, layer, active) + 2 * cfg.d_model


def mtp_parameters(cfg: ModelConfig, active: bool = False) -> int:
    """The MTP modules (their embedding and output head are the main model's): per depth three norms, the
    2d -> d projection and one block."""
    d = cfg.d_model
    return sum(3 * d + 2 * d * d + block_parameters(cfg, cfg.n_layers + k, active) for k in range(cfg.mtp_depth))


def count_parameters(cfg: ModelConfig, include_embedding: bool = True, active: bool = False,
                     include_mtp: bool = True) -> int:
    """Exactly `sum(p.numel())` of the built model (a tied head counted once); `active`: the parameters one
    token uses (MoE: its routed experts only); `include_mtp`: with the multi-token-prediction modules."""
    body = sum(block_parameters(cfg, i, active) for i in range(cfg.n_layers)) + cfg.d_model  # + final norm
    body += mtp_parameters(cfg, active) if include_mtp else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    embedding = cfg.vocab_size * cfg.d_model if include_embedding else 0
    return body + head + embedding


def count_parameters_non_embedding(cfg: ModelConfig) -> int:
    return count_parameters(cfg, include_embedding=False) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token in training: every linear of the blocks (MoE: the router and
    the experts the token is routed to), the LM head, and per MTP depth its projection, block and the shared
    head (the embedding lookup and the norms do no matmul)."""
    attention = attention_matmul_parameters(cfg)
    blocks = sum(attention + mlp_parameters(cfg, i, active=True) for i in range(cfg.n_layers))
    main = blocks + cfg.vocab_size * cfg.d_model
    mtp = sum(2 * cfg.d_model**2 + attention + mlp_parameters(cfg, cfg.n_layers + k, active=True)
              + cfg.vocab_size * cfg.d_model for k in range(cfg.mtp_depth))
    return main + mtp


def attention_context(cfg: ModelConfig, seq_len: int) -> float:
    """Mean number of keys a query attends to is about seq_len / 2 (causal); the 6N + 12 L d T convention
    (PaLM appendix B, Chinchilla) counts the full T, which we keep; a sliding window caps it."""
    return min(seq_len, cfg.sliding_window) if cfg.sliding_window > 0 else seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """2 FLOPs per matmul weight, plus QK^T and AV in every block (GQA: 2 * 2 * n_layers * d_attn * context)."""
    layers = cfg.n_layers + cfg.mtp_depth
    return 2 * matmul_parameters(cfg) + layers * attention_score_flops(cfg, attention_context(cfg, seq_len))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3x forward (backward is 2x), i.e. 6N + 12 * n_layers * d_attn * T for GQA."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def lora_flops_per_token(cfg: ModelConfig, seq_len: int, adapter_parameters: int) -> float:
    """Training FLOPs per token with the base frozen (LoRA): the base's weight gradients (2 per matmul parameter)
    are not computed, the adapters' forward and backward (6 per adapter parameter) are."""
    return flops_per_token(cfg, seq_len) - 2 * matmul_parameters(cfg) + 6 * adapter_parameters

