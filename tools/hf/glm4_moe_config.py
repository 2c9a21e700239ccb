"""Our GQA + Mixture-of-Experts model config -> transformers' `Glm4MoeConfig` (config.json of a Glm4MoeForCausalLM
folder, transformers 5.x form).

Glm4MoeForCausalLM computes what our Transformer computes with `model.attention: gqa` and DeepSeek-V3-style MoE
(pretrain/model/moe.py) when it is set to rotate whole heads (`partial_rotary_factor` 1.0; its default is 0.5), no
q/k norm and no attention bias: the same attention and RoPE as LlamaForCausalLM (tools/hf/llama_config.py), dense
SwiGLU layers before `first_k_dense_replace`, then a router that is ours with sigmoid scores: the per-expert
`e_score_correction_bias` only selects, groups scored by their best two biased scores, the best `topk_group` of
`n_group` groups kept, the top-k experts' unbiased scores as weights (normalized when `norm_topk_prob`) times
`routed_scaling_factor`, plus `n_shared_experts` always-on experts as one SwiGLU MLP. Every other routing variant is
refused by name (`refuse_unexportable_moe`).
"""

from __future__ import annotations

from typing import Any

from pretrain.model.config import ModelConfig
from tools.hf import ConversionError, moe_config

ARCHITECTURE = "Glm4MoeForCausalLM"
MODEL_TYPE = "glm4_moe"
KEYS = {  # our routing setting -> its config.json key (DeepseekV3's too)
    "model.moe.num_experts": "n_routed_experts", "model.moe.top_k": "num_experts_per_tok",
    "model.moe.expert_hidden": "moe_intermediate_size", "model.moe.num_shared_experts": "n_shared_experts",
    "model.moe.first_k_dense": "first_k_dense_replace", "model.moe.norm_topk": "norm_topk_prob",
    "model.moe.routed_scaling": "routed_scaling_factor", "model.moe.n_groups": "n_group",
    "model.moe.topk_groups": "topk_group",
}


def refuse_unexportable_moe(model: ModelConfig, where: str) -> None:
    """What Glm4MoeForCausalLM cannot compute exactly, named."""
    refused = moe_config.gqa_refusals(model, ARCHITECTURE) + moe_refusals(model, ARCHITECTURE)
    moe_config.refuse(refused, where, ARCHITECTURE)


def moe_refusals(model: ModelConfig, architecture: str) -> list[str]:
    """What a DeepSeek-style MoE model of transformers (Glm4Moe, DeepseekV3: the same router) cannot compute
    exactly, named."""
    moe = model.moe
    refused = []
    if model.sliding_window:
        refused.append(f"sliding-window attention (model.sliding_window: {model.sliding_window}; {architecture} "
                       "attends to the whole context)")
    if moe.score_func != "sigmoid":
        refused.append(f"Mixture-of-Experts with {moe.score_func} routing (model.moe.score_func: {moe.score_func}; "
                       f"{architecture}'s router scores experts with a sigmoid)")
    refused += moe_config.capacity_refusals(model, architecture)
    if moe.num_shared_experts == 0:
        refused.append(f"Mixture-of-Experts without shared experts (model.moe.num_shared_experts: 0; every MoE layer "
                       f"of {architecture} has them)")
    if moe.n_groups > 1 and moe.num_experts // moe.n_groups < 2:
        refused.append(f"group-limited routing with one expert per group (model.moe.n_groups: {moe.n_groups}, "
                       f"{moe.num_experts} experts; {architecture} scores a group by its best two)")
    return refused


def to_glm4_moe_config(model: ModelConfig, dtype: str, bos: int, eos: int, pad: int,
                       mtp_layers: int = 0) -> dict[str, Any]:
    """config.json of the model; every routing hyperparameter has its own key (`KEYS`); `mtp_layers`: the MTP modules
    written after the main layers (tools/hf/mtp_names.py)."""
    config = moe_config.llama_config_as(ARCHITECTURE, MODEL_TYPE, model, dtype, bos, eos, pad)
    config["rope_parameters"] = config["rope_parameters"] | {"partial_rotary_factor": 1.0}
    return config | {"use_qk_norm": False, **moe_config_keys(model, mtp_layers)}


def moe_config_keys(model: ModelConfig, mtp_layers: int = 0) -> dict[str, Any]:
    """The DeepSeek-style MoE keys Glm4Moe and DeepseekV3 configs share, and `mtp_layers` MTP layers
    (tools/hf/mtp_names.py) in `num_nextn_predict_layers` (transformers' alias of its `num_mtp_layers`: what
    `generate(use_mtp=True)` drafts with). With MTP layers, `tie_last_hidden_states: false`: transformers then hands
    them the last decoder layer's output (`hidden_states[-1]`) before the final norm, as ours take it, instead of the
    normed `last_hidden_state`."""
    return {**moe_config.routing_keys(model, KEYS), "num_nextn_predict_layers": mtp_layers,
            **({"tie_last_hidden_states": False} if mtp_layers else {})}


def routing_mapping(model: ModelConfig) -> dict[str, Any]:
    """Our routing settings and the config.json keys they became (for conversion.json)."""
    return moe_config.routing_mapping(model, "sigmoid (the only one the router computes)", KEYS)


def from_glm4_moe_config(config: dict[str, Any], where: str) -> ModelConfig:
    """Our model config of a Glm4MoeForCausalLM config.json; what our model cannot compute exactly is an error
    naming the key (a Glm4Moe config without `partial_rotary_factor` rotates half of each head: its default)."""
    from dataclasses import replace

    from tools.hf.llama_config import from_llama_config

    moe_config.check_architecture(config, ARCHITECTURE, MODEL_TYPE, where)
    params = dict(config.get("rope_parameters") or {})
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    problems = []
    if partial != 1.0:
        problems.append(f"partial_rotary_factor {partial} (RoPE on part of each head; ours rotates whole heads)")
    if config.get("use_qk_norm"):
        problems.append("use_qk_norm: true (our attention has no q/k norms)")
    if not config.get("n_shared_experts"):
        problems.append("n_shared_experts: 0 (not imported: export needs shared experts)")
    if problems:
        raise ConversionError(f"{where}: not representable by our model: {'; '.join(problems)}")
    params["partial_rotary_factor"] = 1.0
    as_llama = moe_config.as_llama(config, rope_parameters=params)
    return replace(from_llama_config(as_llama, where), moe=moe_from_hf(config))


def moe_from_hf(config: dict[str, Any]) -> Any:
    """Our MoEConfig of a Glm4Moe / DeepseekV3 config.json's routing keys."""
    from pretrain.model.moe import MoEConfig

    n_groups = int(config.get("n_group") or 1)
    return MoEConfig(num_experts=int(config["n_routed_experts"]), top_k=int(config["num_experts_per_tok"]),
                     expert_hidden=int(config["moe_intermediate_size"]),
                     num_shared_experts=int(config["n_shared_experts"]),
                     first_k_dense=int(config.get("first_k_dense_replace", 1)), score_func="sigmoid",
                     norm_topk=bool(config.get("norm_topk_prob", True)),
                     routed_scaling=float(config.get("routed_scaling_factor", 1.0)), n_groups=n_groups,
                     topk_groups=int(config.get("topk_group") or 1) if n_groups > 1 else 1)
