"""Shape of the decoder-only language model."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.model.moe import MoEConfig


@dataclass
class RopeConfig:
    """Rotary embeddings and their context-extension scalings (see pretrain/model/rope.py for the formulas).
    `original_max_seq_len`: the length the model was trained at before extension (every scaling needs it)."""

    theta: float = 10000.0
    scaling: str = "none"  # none | linear (PI) | ntk | dynamic (NTK) | yarn | llama3
    factor: float = 1.0
    original_max_seq_len: int = 0
    # YaRN: the ramp between extrapolated (>= beta_fast rotations) and interpolated (<= beta_slow) frequencies;
    # the attention factor on cos/sin (0: 0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio when both set);
    # MLA's softmax scale also gets (0.1 mscale_all_dim ln(factor) + 1)^2 when mscale_all_dim is set (DeepSeek-V3)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0
    truncate: bool = True
    # Llama 3: wavelengths above original/low_freq_factor are interpolated, below original/high_freq_factor kept
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def max_supported_seq_len(self, max_seq_len: int) -> int:
        if self.scaling == "none":
            return max_seq_len
        return int(max(max_seq_len, self.original_max_seq_len * self.factor))


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3), used when model.attention = "mla"; defaults are DeepSeek-V3's
    sizes. Per head, queries and keys are [qk_nope_head_dim | qk_rope_head_dim] (RoPE on the second part only) and
    values v_head_dim; keys and values come from one kv_lora_rank latent."""

    q_lora_rank: int = 1536  # 0: no query compression, a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # GQA only: MLA gives every head its own keys and values
    # "gqa": grouped-query attention (n_kv_heads groups; n_kv_heads = n_heads is plain multi-head attention);
    # "mla": DeepSeek's Multi-head Latent Attention with the sizes in `mla` (head_dim is then unused).
    attention: str = "gqa"
    mla: MLAConfig = field(default_factory=MLAConfig)
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
    def rope_dim(self) -> int:
        """The part of a query/key head that RoPE rotates: the whole GQA head, MLA's qk_rope_head_dim."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.head_dim

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
