"""RoPE scalings against Hugging Face transformers' own RoPE initialization (the reference implementation): inverse
frequencies and attention factors for every type, head dims, bases and factors (non-integer ones included), the
cos/sin a model feeds its attention, DeepSeek's MLA softmax correction, fp32 frequencies, validation."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pretrain.config import ConfigError, load_config
from pretrain.model.config import ModelConfig, RopeConfig
from pretrain.model.rope import mla_softmax_multiplier, rope_attention_factor, rope_frequencies
from pretrain.model.transformer import Transformer

DIMS = [32, 64, 128]
THETAS = [1e4, 5e5]
FACTORS = [2.0, 2.5, 8.0, 40.0]
ORIGINAL = 1024
def hf_config(rope: RopeConfig, dim: int) -> LlamaConfig:
    """The same RoPE setup in transformers' terms. Its `dynamic` type takes the original length from
    max_position_embeddings, the others from original_max_position_embeddings; a zero attention factor or mscale
    is ours for "not set"."""
    params = {"rope_type": rope.scaling, "rope_theta": rope.theta, "factor": rope.factor}
    if rope.scaling != "dynamic":
        params["original_max_position_embeddings"] = rope.original_max_seq_len
    if rope.scaling == "yarn":
        params.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        optional = ("mscale", "mscale_all_dim", "attention_factor")
        params.update({key: getattr(rope, key) for key in optional if getattr(rope, key)})
    if rope.scaling == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    extended = rope.original_max_seq_len if rope.scaling == "dynamic" else int(rope.original_max_seq_len * rope.factor)
    return LlamaConfig(hidden_size=dim * 4, num_attention_heads=4, head_dim=dim, max_position_embeddings=extended,
                       rope_parameters=params)


def cases():
    for dim in DIMS:
        for theta in THETAS:
            for factor in FACTORS:
                yield "linear", dim, theta, factor, {}
                yield "dynamic", dim, theta, factor, {}
                yield "yarn", dim, theta, factor, {}
                yield "llama3", dim, theta, factor, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
            yield "yarn", dim, theta, 40.0, {"mscale": 1.0, "mscale_all_dim": 1.0}  # DeepSeek-V3
            yield "yarn", dim, theta, 4.5, {"mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0,
                                             "beta_slow": 2.0, "truncate": False}
            yield "yarn", dim, theta, 8.0, {"attention_factor": 1.3}
            yield "llama3", dim, theta, 8.0, {"low_freq_factor": 2.0, "high_freq_factor": 6.5}


@pytest.mark.parametrize("scaling,dim,theta,factor,extra", list(cases()))
def test_frequencies_and_attention_factor_match_transformers(scaling, dim, theta, factor, extra):
    rope = RopeConfig(theta=theta, scaling=scaling, factor=factor, original_max_seq_len=ORIGINAL, **extra)
    hf_inv_freq, hf_attention = ROPE_INIT_FUNCTIONS[scaling](hf_config(rope, dim), "cpu")
    ours = rope_frequencies(rope, dim)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf_inv_freq.float(), rtol=2e-6, atol=0)
    assert rope_attention_factor(rope) == pytest.approx(hf_attention, rel=1e-12)
    if scaling == "dynamic":  # beyond the original length the base grows with the current length
        longer = int(ORIGINAL * 3.7)
        hf_longer, _ = ROPE_INIT_FUNCTIONS[scaling](hf_config(rope, dim), "cpu", seq_len=longer)
        torch.testing.assert_close(rope_frequencies(rope, dim, longer), hf_longer.float(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("dim,factor", [(64, 2.0), (128, 8.5)])
def test_static_ntk_is_dynamic_ntk_at_its_matching_length(dim, factor):
    """Static NTK-aware scaling (base x factor^(d/(d-2))) has no transformers type of its own: it equals the dynamic
    one at the length where s*n/L - (s-1) = s, n = L(2s-1)/s."""
    rope = RopeConfig(theta=1e4, scaling="ntk", factor=factor, original_max_seq_len=ORIGINAL)
    dynamic = RopeConfig(theta=1e4, scaling="dynamic", factor=factor, original_max_seq_len=ORIGINAL)
    length = ORIGINAL * (2 * factor - 1) / factor
    hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(dynamic, dim), "cpu", seq_len=length)
    torch.testing.assert_close(rope_frequencies(rope, dim), hf.float(), rtol=2e-6, atol=0)
    assert (rope_frequencies(rope, dim) <= rope_frequencies(RopeConfig(), dim)).all()


@pytest.mark.parametrize("factor,mscale_all_dim", [(40.0, 1.0), (40.0, 0.707), (4.0, 1.0), (8.0, 0.0)])
def test_mla_softmax_correction_matches_deepseek(factor, mscale_all_dim):
    rope = RopeConfig(scaling="yarn", factor=factor, original_max_seq_len=4096, mscale=1.0,
                      mscale_all_dim=mscale_all_dim)
    params = {"rope_type": "yarn", "factor": factor, "mscale_all_dim": mscale_all_dim}
    assert mla_softmax_multiplier(rope) == pytest.approx(yarn_apply_mscale(params, 1.0), rel=1e-12)
    if factor == 40.0 and mscale_all_dim == 1.0:
        assert mla_softmax_multiplier(rope) == pytest.approx((0.1 * math.log(40) + 1) ** 2) == pytest.approx(1.874,
                                                                                                          abs=1e-3)


def tiny_model(rope: RopeConfig, attention: str = "gqa") -> Transformer:
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=4 * ORIGINAL,
                      rope=rope, attention=attention)
    if attention == "mla":
        cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank, cfg.mla.qk_nope_head_dim = 0, 32, 16
        cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim = 16, 16
    return Transformer(cfg)


@pytest.mark.parametrize("rope", [
    RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=ORIGINAL),
    RopeConfig(scaling="llama3", factor=8.0, original_max_seq_len=ORIGINAL, theta=5e5),
    RopeConfig(scaling="dynamic", factor=4.0, original_max_seq_len=ORIGINAL),
    RopeConfig(scaling="linear", factor=2.5, original_max_seq_len=ORIGINAL),
], ids=lambda r: r.scaling)
def test_model_cos_sin_match_transformers_rotary_embedding(rope):
    """What the attention receives: cos and sin (YaRN's attention factor included), at a length beyond the
    original, equal transformers' rotary embedding for the same setup."""
    model = tiny_model(rope)
    length = 3 * ORIGINAL + 5
    reference = LlamaRotaryEmbedding(hf_config(rope, model.cfg.head_dim))
    hf_cos, hf_sin = reference(torch.zeros(1, length, model.cfg.head_dim), torch.arange(length)[None])
    cos, sin = model.rope(length)
    # angles are rounded in fp32 on both sides (transformers by a matmul): one ulp of the largest angle (~3,000 rad)
    ulp = length * 2**-23
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=ulp)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=ulp)


def test_frequencies_stay_float32_and_out_of_checkpoints():
    rope = RopeConfig(scaling="yarn", factor=40.0, original_max_seq_len=ORIGINAL)
    model = tiny_model(rope)
    assert "inv_freq" not in model.state_dict()
    reference = model.rope(2048)
    model.to(torch.bfloat16)  # e.g. an engine casting the whole module: the frequencies must not go bf16
    cos, sin = model.rope(2048)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close((cos, sin), reference, rtol=0, atol=0)


def test_mla_softmax_scale_gets_the_correction():
    rope = RopeConfig(scaling="yarn", factor=40.0, original_max_seq_len=ORIGINAL, mscale=1.0, mscale_all_dim=1.0)
    attention = tiny_model(rope, "mla").layers[0].attn
    plain = tiny_model(RopeConfig(), "mla").layers[0].attn
    assert attention.scale / plain.scale == pytest.approx((0.1 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize("overrides,field", [
    (["model.rope.scaling=yarn", "model.rope.factor=4"], "model.rope.original_max_seq_len"),
    (["model.rope.scaling=linear", "model.rope.factor=0.5", "model.rope.original_max_seq_len=256"],
     "model.rope.factor"),
    (["model.rope.scaling=yarn", "model.rope.factor=4", "model.rope.original_max_seq_len=256",
      "model.rope.beta_fast=1", "model.rope.beta_slow=32"], "model.rope.beta_fast"),
    (["model.rope.scaling=llama3", "model.rope.factor=8", "model.rope.original_max_seq_len=256",
      "model.rope.high_freq_factor=1"], "model.rope.high_freq_factor"),
    (["model.rope.scaling=longrope"], "model.rope.scaling"),
    (["model.rope.scaling=yarn", "model.rope.factor=2", "model.rope.original_max_seq_len=256",
      "model.max_seq_len=256", "data.seq_len=1024"], "data.seq_len"),  # 2 x 256 supported, 1024 asked
])
def test_bad_rope_settings_are_config_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("configs/tiny.yaml", overrides, check_paths=False)


def test_a_scaled_config_loads_and_supports_its_extended_length():
    cfg = load_config("configs/tiny.yaml", ["model.rope.scaling=yarn", "model.rope.factor=4",
                                            "model.rope.original_max_seq_len=256", "model.max_seq_len=256",
                                            "data.seq_len=1024"], check_paths=False)
    assert cfg.model.rope.max_supported_seq_len(cfg.model.max_seq_len) == 1024
