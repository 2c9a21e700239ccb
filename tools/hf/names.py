"""Tensor names: our Transformer's (pretrain/model/transformer.py) <-> transformers' LlamaForCausalLM. The modules
are named alike on purpose, so the conversion is this table; no tensor is reshaped or permuted (RoPE is rotate-half
on both sides, see tools/hf/llama_config.py)."""

from __future__ import annotations

import re

from tools.hf import ConversionError

TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}
PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_THEIRS = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FROM_HF_LAYER = {theirs: ours for ours, theirs in PER_LAYER.items()}
_FROM_HF_TOP = {theirs: ours for ours, theirs in TOP.items()}


def to_hf(name: str) -> str:
    if name in TOP:
        return TOP[name]
    match = _OURS.fullmatch(name)
    if match and match[2] in PER_LAYER:
        return f"model.layers.{match[1]}.{PER_LAYER[match[2]]}"
    raise ConversionError(f"tensor '{name}' has no LlamaForCausalLM counterpart")


def from_hf(name: str) -> str | None:
    """Our name of a LlamaForCausalLM tensor, None for one we do not know."""
    if name in _FROM_HF_TOP:
        return _FROM_HF_TOP[name]
    match = _THEIRS.fullmatch(name)
    if match and match[2] in _FROM_HF_LAYER:
        return f"layers.{match[1]}.{_FROM_HF_LAYER[match[2]]}"
    return None


def mapping_table() -> dict[str, str]:
    """Our name -> theirs, per-layer names with `{i}` for the layer index (for conversion.json and the README)."""
    layer = {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{theirs}" for ours, theirs in PER_LAYER.items()}
    return {"embed.weight": TOP["embed.weight"], **layer, "norm.weight": TOP["norm.weight"],
            "lm_head.weight": TOP["lm_head.weight"]}
