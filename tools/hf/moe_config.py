"""What the config.json mappings of transformers' MoE architectures share (Glm4Moe and DeepseekV3:
tools/hf/glm4_moe_config.py, tools/hf/deepseek_v3_config.py; Mixtral: tools/hf/mixtral_config.py): LlamaForCausalLM's
config relabelled, our routing settings under the keys of one table per architecture (written to config.json and
recorded in conversion.json alike), and the refusals they word alike.
"""

from __future__ import annotations

from typing import Any

from pretrain.model.config import ModelConfig
from tools.hf import ConversionError
from tools.hf.llama_config import to_llama_config


def llama_config_as(architecture: str, model_type: str, model: ModelConfig, dtype: str, bos: int, eos: int, pad: int,
                    drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """LlamaForCausalLM's config.json of the model (tools/hf/llama_config.py) as `architecture`'s, without
    `mlp_bias` and the keys in `drop`: what an MoE architecture's config.json adds its own keys to."""
    config = {k: v for k, v in to_llama_config(model, dtype, bos, eos, pad).items() if k not in ("mlp_bias", *drop)}
    return config | {"architectures": [architecture], "model_type": model_type}


def routing_keys(model: ModelConfig, keys: dict[str, str]) -> dict[str, Any]:
    """Our settings that `keys` names (our config key -> their config.json key), under their keys, as exported."""
    moe = model.moe
    ours = {
        "model.moe.num_experts": moe.num_experts,
        "model.moe.top_k": moe.top_k,
        "model.moe.expert_hidden": moe.hidden(model.ffn_dim),
        "model.moe.num_shared_experts": moe.num_shared_experts,
        "model.moe.first_k_dense": moe.first_k_dense,
        "model.moe.norm_topk": moe.norm_topk,
        "model.moe.routed_scaling": moe.routed_scaling,
        "model.moe.n_groups": moe.n_groups,
        "model.moe.topk_groups": moe.topk_groups if moe.n_groups > 1 else 1,
        "model.sliding_window": model.sliding_window or None,
    }
    return {theirs: ours[key] for key, theirs in keys.items()}


def routing_mapping(model: ModelConfig, score_func: str, keys: dict[str, str],
                    fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our routing settings and the config.json keys they became (for conversion.json): `score_func`, what their router
    computes; `keys`, as `routing_keys`; `fixed`, the settings their architecture has no key for (checked on export)."""
    moe = model.moe
    return {
        "score_func": {"ours": moe.score_func, "theirs": score_func},
        **keys,
        **({"fixed (checked)": dict(fixed)} if fixed else {}),
        "training only, not exported": {"bias_update_rate": moe.bias_update_rate,
                                        "aux_loss_weight": moe.aux_loss_weight, "router_z_loss": moe.router_z_loss},
    }


def gqa_refusals(model: ModelConfig, architecture: str) -> list[str]:
    if model.attention != "gqa":
        return [f"Multi-head Latent Attention (model.attention: {model.attention}; {architecture} has GQA attention)"]
    return []


def capacity_refusals(model: ModelConfig, architecture: str) -> list[str]:
    if model.moe.capacity_factor > 0:
        return [f"Mixture-of-Experts with an expert capacity (model.moe.capacity_factor: {model.moe.capacity_factor} "
                f"drops tokens; {architecture} is dropless)"]
    return []


def refuse(refused: list[str], where: str, architecture: str, lead: str = "") -> None:
    """The export of `where` refused for what `refused` names, if anything."""
    if refused:
        raise ConversionError(f"{where}: {lead}cannot export {'; '.join(refused)} to {architecture}")


def check_architecture(config: dict[str, Any], architecture: str, model_type: str, where: str) -> None:
    if config.get("architectures") != [architecture] or config.get("model_type") != model_type:
        raise ConversionError(f"{where} describes {config.get('architectures')}: not {architecture}")


def as_llama(config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """An MoE architecture's config.json relabelled LlamaForCausalLM (and `changes`), for from_llama_config."""
    return config | {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **changes}
