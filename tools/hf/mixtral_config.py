"""Our GQA + softmax top-k Mixture-of-Experts model config <-> transformers' `MixtralConfig` (config.json of a
MixtralForCausalLM folder, transformers 5.x form).

MixtralForCausalLM computes what our Transformer computes with `model.attention: gqa` and `model.moe.score_func:
softmax` when every layer is an MoE layer, there are no shared experts and the top-k weights are renormalized: the
attention, RoPE and norms of LlamaForCausalLM (tools/hf/llama_config.py), sliding-window attention with our window
(a position sees itself and the `sliding_window - 1` before it, on both sides), and a router that takes the softmax
over all `num_local_experts` router logits in float32, keeps the top `num_experts_per_tok` and divides them by their
sum (always: it has no `norm_topk_prob`), then SwiGLU experts of `intermediate_size`. Everything else of our
softmax routing has no exact counterpart and is refused by name (`refuse_unexportable_mixtral`), with the reason:

    shared experts           Mixtral has none; Qwen2-MoE's shared expert is scaled by a sigmoid gate ours lacks
    dense first layers,      every Mixtral layer is MoE and it always renormalizes; Qwen3-MoE has
    unnormalized top-k         `mlp_only_layers` and `norm_topk_prob` but always q/k norms ours lacks (logits off
                               by 1.4 with unit norm weights); Qwen2-MoE always has its sigmoid-gated shared expert:
                               with a zero-width one (shared_expert_intermediate_size 0, zero-size tensors) it
                               computes ours (measured: 1.4e-6), a degenerate form not exported
    routed scaling, groups   Mixtral weights by the renormalized scores of all experts; DeepseekV2's softmax
                               router has both, but MLA attention
    expert capacity          Mixtral is dropless
    a selection bias         Mixtral selects by the softmax scores alone (checked by value when exporting)
    MTP modules              Mixtral has no MTP layers (--mtp drop leaves them out)
"""

from __future__ import annotations

from typing import Any

from pretrain.model.config import ModelConfig
from tools.hf import moe_config

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"
KEYS = {"model.moe.num_experts": "num_local_experts", "model.moe.top_k": "num_experts_per_tok",  # ours -> theirs
        "model.moe.expert_hidden": "intermediate_size", "model.sliding_window": "sliding_window"}
FIXED = {"num_shared_experts": 0, "first_k_dense": 0, "norm_topk": True, "routed_scaling": 1.0, "n_groups": 1,
         "capacity_factor": 0.0, "expert_bias": "zero (not written)"}  # what Mixtral computes: checked on export
QWEN_NOTE = ("Qwen3-MoE, which has dense layers and norm_topk_prob, also has q/k norms ours lacks; Qwen2-MoE "
             "matches only with a zero-width shared expert, which is not exported")


def refuse_unexportable_mixtral(model: ModelConfig, where: str) -> None:
    """What MixtralForCausalLM cannot compute exactly, named, with why no other architecture of transformers does."""
    moe = model.moe
    refused = moe_config.gqa_refusals(model, ARCHITECTURE)
    if moe.num_shared_experts:
        refused.append(f"shared experts (model.moe.num_shared_experts: {moe.num_shared_experts}; {ARCHITECTURE} "
                       "has none, and Qwen2-MoE's shared expert has a sigmoid gate ours lacks)")
    if moe.first_k_dense:
        refused.append(f"dense first layers (model.moe.first_k_dense: {moe.first_k_dense}; every {ARCHITECTURE} "
                       f"layer is MoE; {QWEN_NOTE})")
    if not moe.norm_topk:
        refused.append(f"unnormalized top-k weights (model.moe.norm_topk: false; {ARCHITECTURE} always renormalizes "
                       f"the top-k softmax scores; {QWEN_NOTE})")
    if moe.routed_scaling != 1.0:
        refused.append(f"routed scaling (model.moe.routed_scaling: {moe.routed_scaling}; {ARCHITECTURE} weights "
                       "experts by the renormalized scores alone)")
    if moe.n_groups > 1:
        refused.append(f"group-limited routing (model.moe.n_groups: {moe.n_groups}; {ARCHITECTURE} chooses among "
                       "all experts)")
    refused += moe_config.capacity_refusals(model, ARCHITECTURE)
    moe_config.refuse(refused, where, ARCHITECTURE, lead=f"softmax top-k MoE exports as {ARCHITECTURE} only: ")


def to_mixtral_config(model: ModelConfig, dtype: str, bos: int, eos: int, pad: int) -> dict[str, Any]:
    """config.json of the model (our name -> theirs in `KEYS`)."""
    config = moe_config.llama_config_as(ARCHITECTURE, MODEL_TYPE, model, dtype, bos, eos, pad, drop=("attention_bias",))
    return config | moe_config.routing_keys(model, KEYS) | {"router_jitter_noise": 0.0, "output_router_logits": False}


def routing_mapping(model: ModelConfig) -> dict[str, Any]:
    """Our routing settings and the config.json keys they became (for conversion.json)."""
    return moe_config.routing_mapping(model, "softmax over all experts, top-k renormalized (always)", KEYS, FIXED)


def from_mixtral_config(config: dict[str, Any], where: str) -> ModelConfig:
    """Our model config of a MixtralForCausalLM config.json: softmax routing, every layer MoE, no shared experts,
    top-k renormalized, zero selection biases; what our model cannot compute exactly is an error naming the key."""
    from dataclasses import replace

    from pretrain.model.moe import MoEConfig
    from tools.hf.llama_config import from_llama_config

    moe_config.check_architecture(config, ARCHITECTURE, MODEL_TYPE, where)
    model = from_llama_config(moe_config.as_llama(config), where)
    hidden = int(config["intermediate_size"])
    moe = MoEConfig(num_experts=int(config["num_local_experts"]), top_k=int(config["num_experts_per_tok"]),
                    expert_hidden=hidden, num_shared_experts=0, first_k_dense=0, score_func="softmax",
                    norm_topk=True, routed_scaling=1.0)
    return replace(model, moe=moe, sliding_window=int(config.get("sliding_window") or 0))
