"""Shape of the decoder-only language model."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.model.moe import MoEConfig


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # Context-extension scalings (PI, NTK, YaRN, Llama-3) hook in here; "none" is plain RoPE.
    scaling: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0

    def max_supported_seq_len(self, max_seq_len: int) -> int:
        if self.scaling == "none":
            return max_seq_len
        return int(max(max_seq_len, self.original_max_seq_len * self.factor))


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    # 0 means "derive": SwiGLU's 8/3 * d_model rounded up to a multiple of `ffn_multiple_of`.
    ffn_hidden: int = 0
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # 0 means full causal attention; w > 0 lets each token see itself and the w - 1 tokens before it.
    sliding_window: int = 0
    dropout: float = 0.0
    init_std: float = 0.02
    # Mixture-of-Experts feed-forward in every layer from moe.first_k_dense on (num_experts > 0).
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Multi-token prediction (DeepSeek-V3): modules predicting 2..mtp_depth+1 tokens ahead during training;
    # their mean cross-entropy, times mtp_weight, joins the loss. Inference uses the main model only.
    mtp_depth: int = 0
    mtp_weight: float = 0.3

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return ((hidden + m - 1) // m) * m

    def build(self):
        from pretrain.model.transformer import Transformer

        return Transformer(self)
