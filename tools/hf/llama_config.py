"""Our model config <-> transformers' `LlamaConfig` (config.json of a LlamaForCausalLM folder, transformers 5.x form).

LlamaForCausalLM computes what our Transformer computes with `model.attention: gqa`, no MoE, no MTP and full causal
attention: RMSNorm, RoPE in the rotate-half layout (ours too: q/k are stored as they are, no permutation), key/value
head j serving query heads j·g .. j·g+g-1 (repeat_interleave on both sides), SwiGLU, no biases.

RoPE (`rope_parameters`): none -> default; ntk -> default with the base θ·s^(d/(d-2)) that static NTK amounts to;
linear, dynamic, yarn, llama3 -> the type of the same name. transformers' dynamic type reads the original length from
`max_position_embeddings`, its linear type keeps no original length (on import it is max_position_embeddings / s).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from pretrain.model.config import ModelConfig, RopeConfig
from tools.hf import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
HF_ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN


def refuse_unexportable(model: ModelConfig, where: str) -> None:
    """Features LlamaForCausalLM cannot hold, named; other architectures get their own exports later."""
    refused = []
    if model.attention != "gqa":
        refused.append(f"Multi-head Latent Attention (model.attention: {model.attention})")
    if model.moe.enabled:
        refused.append(f"Mixture-of-Experts (model.moe.num_experts: {model.moe.num_experts})")
    if model.mtp_depth:
        refused.append(f"multi-token prediction modules (model.mtp_depth: {model.mtp_depth})")
    if model.sliding_window:
        refused.append(f"sliding-window attention (model.sliding_window: {model.sliding_window}; LlamaForCausalLM "
                       "attends to the whole context)")
    if refused:
        raise ConversionError(f"{where}: cannot export {'; '.join(refused)} to {ARCHITECTURE}: only dense GQA models "
                              "convert for now")


def _rope_exponent(dim: int) -> float:
    return dim / (dim - 2) if dim > 2 else 1.0  # as pretrain/model/rope.py's NTK base growth


def rope_parameters(model: ModelConfig) -> tuple[dict[str, Any], int]:
    """(rope_parameters, max_position_embeddings) of our RoPE setup."""
    rope = model.rope
    supported = rope.max_supported_seq_len(model.max_seq_len)
    if rope.scaling == "none":
        return {"rope_type": "default", "rope_theta": rope.theta}, model.max_seq_len
    if rope.scaling == "ntk":
        return {"rope_type": "default",
                "rope_theta": rope.theta * rope.factor ** _rope_exponent(model.head_dim)}, supported
    params: dict[str, Any] = {"rope_type": rope.scaling, "rope_theta": rope.theta, "factor": rope.factor}
    if rope.scaling == "linear":
        return params, supported
    if rope.scaling == "dynamic":
        return params, rope.original_max_seq_len
    params["original_max_position_embeddings"] = rope.original_max_seq_len
    if rope.scaling == "yarn":
        params |= {"beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow, "truncate": rope.truncate}
        params |= {key: getattr(rope, key) for key in ("attention_factor", "mscale", "mscale_all_dim")
                   if getattr(rope, key)}  # 0 is ours for "not set"
        return params, supported
    if rope.scaling == "llama3":
        params |= {"low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor}
        return params, supported
    raise ConversionError(f"RoPE scaling '{rope.scaling}' has no transformers counterpart")


def to_llama_config(model: ModelConfig, dtype: str, bos: int, eos: int, pad: int) -> dict[str, Any]:
    rope, max_positions = rope_parameters(model)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.ffn_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": model.norm_eps,
        "initializer_range": model.init_std,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "rope_parameters": rope,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "dtype": dtype,
    }


def _required(config: dict[str, Any], key: str, where: str) -> Any:
    if config.get(key) is None:
        raise ConversionError(f"{where} has no '{key}'")
    return config[key]


def _rope_from_hf(config: dict[str, Any], max_positions: int, where: str) -> RopeConfig:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})  # 5.x form, or 4.x's
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{where}: partial_rotary_factor {partial} (RoPE on part of each head) is not "
                              "representable: our GQA attention rotates whole heads")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type not in ("linear", "dynamic", "yarn", "llama3"):
        raise ConversionError(f"{where}: rope_type '{rope_type}' is not representable (ours: default, linear, "
                              "dynamic, yarn, llama3)")
    original = int(params.get("original_max_position_embeddings") or max_positions)
    factor = params.get("factor") or (max_positions / original if rope_type == "yarn" else None)
    if factor is None:
        raise ConversionError(f"{where}: rope_type '{rope_type}' without a 'factor'")
    rope = RopeConfig(theta=theta, scaling=rope_type, factor=float(factor))
    if rope_type == "linear":
        rope.original_max_seq_len = max(1, math.floor(max_positions / rope.factor))
    elif rope_type == "dynamic":
        rope.original_max_seq_len = max_positions
    elif rope_type == "yarn":
        rope.original_max_seq_len = original
        rope.beta_fast = float(params.get("beta_fast") or 32.0)
        rope.beta_slow = float(params.get("beta_slow") or 1.0)
        rope.truncate = bool(params.get("truncate", True))
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            value = params.get(key)
            if value is not None and value <= 0 and key == "attention_factor":
                raise ConversionError(f"{where}: YaRN attention_factor {value} is not representable (ours: > 0)")
            setattr(rope, key, float(value or 0.0))
    else:
        rope.original_max_seq_len = original
        rope.low_freq_factor = float(_required(params, "low_freq_factor", f"{where} rope_parameters"))
        rope.high_freq_factor = float(_required(params, "high_freq_factor", f"{where} rope_parameters"))
    return rope


def from_llama_config(config: dict[str, Any], where: str) -> ModelConfig:
    """Our model config of a LlamaForCausalLM config.json; anything it cannot hold is an error naming the key."""
    architectures = config.get("architectures") or []
    if architectures != [ARCHITECTURE] or config.get("model_type", "llama") != "llama":
        found = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
        raise ConversionError(f"{where} describes {found}: only {ARCHITECTURE} imports (for now)")
    problems = []
    if config.get("hidden_act", "silu") not in HF_ACTIVATIONS:
        problems.append(f"hidden_act '{config['hidden_act']}' (ours: SwiGLU with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}: true (our linear layers have no biases)")
    hidden, heads = _required(config, "hidden_size", where), _required(config, "num_attention_heads", where)
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden} (ours derives head_dim)")
    if problems:
        raise ConversionError(f"{where}: not representable by our model: {'; '.join(problems)}")
    max_positions = int(config.get("max_position_embeddings") or 2048)
    return ModelConfig(
        vocab_size=_required(config, "vocab_size", where),
        d_model=hidden,
        n_layers=_required(config, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        attention="gqa",
        ffn_hidden=_required(config, "intermediate_size", where),
        max_seq_len=max_positions,
        rope=_rope_from_hf(config, max_positions, where),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def check_rope_with_transformers(model: ModelConfig, config: dict[str, Any]) -> str:
    """Builds transformers' own Llama rotary embedding from `config` and compares its inverse frequencies and
    attention factor with ours (beyond the original length too, for dynamic); returns what was checked."""
    try:
        import torch
        import transformers
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    except ImportError:
        return "not checked: transformers is not installed"
    from pretrain.model.rope import rope_attention_factor, rope_frequencies

    settings = copy.deepcopy({k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype")})
    reference = LlamaRotaryEmbedding(LlamaConfig(**settings))
    lengths = [None]
    if model.rope.scaling == "dynamic":
        lengths.append(3 * config["max_position_embeddings"] + 1)
    for length in lengths:
        if length is not None:  # transformers recomputes its dynamic frequencies for the positions it is given
            reference(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
        ours = rope_frequencies(model.rope, model.head_dim, length)
        theirs = reference.inv_freq.float()
        close = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-5, atol=0)
        factor = rope_attention_factor(model.rope)
        if not close or not math.isclose(factor, reference.attention_scaling, rel_tol=1e-9):
            raise ConversionError(f"RoPE '{model.rope.scaling}' {config['rope_parameters']} does not come out the same "
                                  f"in transformers {transformers.__version__}: inverse frequencies "
                                  f"{'equal' if close else 'differ'}, attention factor {factor} vs "
                                  f"{reference.attention_scaling}")
    return f"inverse frequencies and attention factor equal transformers {transformers.__version__}'s"
