"""Parameter counts and training FLOPs per token, for MFU and cost estimates."""

from __future__ import annotations

from pretrain.model.config import ModelConfig


def block_parameters(cfg: ModelConfig) -> int:
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.d_model * cfg.ffn_dim
    norms = 2 * cfg.d_model
    return attn + mlp + norms


def count_parameters(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Exactly `sum(p.numel())` of the built model (a tied head counted once)."""
    body = cfg.n_layers * block_parameters(cfg) + cfg.d_model  # blocks + final norm
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    embedding = cfg.vocab_size * cfg.d_model if include_embedding else 0
    return body + head + embedding


def count_parameters_non_embedding(cfg: ModelConfig) -> int:
    return count_parameters(cfg, include_embedding=False) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every linear of the blocks and the LM head
    (the embedding lookup and the norms do no matmul)."""
    per_block = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * cfg.ffn_dim
    return cfg.n_layers * per_block + cfg.vocab_size * cfg.d_model


def attention_context(cfg: ModelConfig, seq_len: int) -> float:
    """Mean number of keys a query attends to is about seq_len / 2 (causal); the 6N + 12 L d T convention
    (PaLM appendix B, Chinchilla) counts the full T, which we keep; a sliding window caps it."""
    return min(seq_len, cfg.sliding_window) if cfg.sliding_window > 0 else seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """2 FLOPs per matmul weight, plus QK^T and AV: 2 * 2 * n_layers * d_attn * context."""
    d_attn = cfg.n_heads * cfg.head_dim
    return 2 * matmul_parameters(cfg) + 4 * cfg.n_layers * d_attn * attention_context(cfg, seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3x forward (backward is 2x), i.e. 6N + 12 * n_layers * d_attn * T."""
    return 3 * forward_flops_per_token(cfg, seq_len)
