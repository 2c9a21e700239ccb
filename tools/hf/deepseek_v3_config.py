"""Our MLA + Mixture-of-Experts model config -> transformers' `DeepseekV3Config` (config.json of a
DeepseekV3ForCausalLM folder, transformers 5.x form).

DeepseekV3ForCausalLM computes what our Transformer computes with `model.attention: mla` (pretrain/model/mla.py)
and DeepSeek-V3-style MoE, with the router of Glm4Moe (tools/hf/glm4_moe_config.py): the same projections and
latent norms, RoPE on the rope part of each head, the softmax scale times DeepSeek's mscale² under YaRN with
`mscale_all_dim`. Ours rotates halves; DeepSeek's checkpoints rotate interleaved pairs (`rope_interleave: true`, its
default), so the export writes the rope rows interleaved (tools/hf/mla_rope.py) with `rope_interleave: true`, as
DeepSeek's own checkpoints are; import takes either. Its latent norms
(`q_a_layernorm`, `kv_a_layernorm`) have transformers' fixed eps 1e-6 whatever `rms_norm_eps` says, so a model
whose `norm_eps` is another is refused, as is everything `moe_refusals` names.
"""

from __future__ import annotations

from typing import Any

from pretrain.model.config import ModelConfig
from tools.hf import ConversionError, moe_config
from tools.hf.glm4_moe_config import moe_config_keys, moe_refusals

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank): the default eps, not rms_norm_eps


def refuse_unexportable_mla(model: ModelConfig, where: str) -> None:
    """What DeepseekV3ForCausalLM cannot compute exactly, named."""
    refused = []
    if not model.moe.enabled:
        refused.append(f"Multi-head Latent Attention without Mixture-of-Experts (model.moe.num_experts: 0; every "
                       f"{ARCHITECTURE} has MoE layers)")
    else:
        refused += moe_refusals(model, ARCHITECTURE)
    if model.norm_eps != LATENT_NORM_EPS:
        refused.append(f"RMSNorm eps {model.norm_eps} (model.norm_eps; {ARCHITECTURE}'s latent norms use "
                       f"{LATENT_NORM_EPS})")
    if model.rope.scaling == "ntk":
        refused.append("static NTK RoPE (model.rope.scaling: ntk) on MLA's rope part")
    moe_config.refuse(refused, where, ARCHITECTURE)


def to_deepseek_v3_config(model: ModelConfig, dtype: str, bos: int, eos: int, pad: int,
                          mtp_layers: int = 0) -> dict[str, Any]:
    """config.json; `mtp_layers`: the MTP modules written after the main layers (tools/hf/mtp_names.py), in
    DeepSeek-V3's `num_nextn_predict_layers` (`moe_config_keys`)."""
    mla = model.mla
    config = moe_config.llama_config_as(ARCHITECTURE, MODEL_TYPE, model, dtype, bos, eos, pad, drop=("head_dim",))
    return config | {
        "num_key_value_heads": model.n_heads,
        "q_lora_rank": mla.q_lora_rank or None,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "rope_interleave": True,
        **moe_config_keys(model, mtp_layers),
    }


def from_deepseek_v3_config(config: dict[str, Any], where: str) -> ModelConfig:
    """Our model config of a DeepseekV3ForCausalLM config.json; what our model cannot compute exactly is an error
    naming the key."""
    from dataclasses import replace

    from pretrain.model.config import MLAConfig
    from tools.hf.glm4_moe_config import moe_from_hf
    from tools.hf.llama_config import from_llama_config

    moe_config.check_architecture(config, ARCHITECTURE, MODEL_TYPE, where)
    problems = []
    if float(config.get("rms_norm_eps", 1e-6)) != LATENT_NORM_EPS:
        problems.append(f"rms_norm_eps {config.get('rms_norm_eps')} (its latent norms use {LATENT_NORM_EPS}, ours "
                        "use one eps for every norm)")
    if not config.get("n_shared_experts"):
        problems.append("n_shared_experts: 0 (not imported: export needs shared experts)")
    if problems:
        raise ConversionError(f"{where}: not representable by our model: {'; '.join(problems)}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    as_llama = moe_config.as_llama(config, head_dim=(hidden or 0) // (heads or 1), num_key_value_heads=heads)
    mla = MLAConfig(q_lora_rank=int(config.get("q_lora_rank") or 0), kv_lora_rank=int(config["kv_lora_rank"]),
                    qk_nope_head_dim=int(config["qk_nope_head_dim"]),
                    qk_rope_head_dim=int(config["qk_rope_head_dim"]), v_head_dim=int(config["v_head_dim"]))
    return replace(from_llama_config(as_llama, where), attention="mla", mla=mla, moe=moe_from_hf(config))
