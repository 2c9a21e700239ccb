"""Tensor names of a softmax top-k MoE model: ours (pretrain/model/moe.py) -> the checkpoint layout of
MixtralForCausalLM, the one Mistral's published checkpoints have and transformers' `save_pretrained` writes (on
loading, transformers renames `block_sparse_moe` to `mlp` and fuses each layer's experts into `gate_up_proj` and
`down_proj`).

Attention, norms and embeddings keep Llama's names (tools/hf/names.py); the rest is tools/hf/moe_names.py's table
with Mixtral's names. The router `mlp.router.weight` becomes `block_sparse_moe.gate.weight`; our stacked experts
`mlp.experts.{gate,up}` [E, d, h] and `mlp.experts.down` [E, h, d] (used as x @ W[e]) become E linears each,
`block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (w1 gate, w3 up, w2 down; [h, d] and [d, h], used as x @ Wᵀ):
expert e's slice, transposed. Our selection bias `mlp.router.expert_bias` has no counterpart: Mixtral selects by the
softmax scores alone, so it is written nowhere and must be zero (`hf_tensors` refuses another; import-hf sets it to
zero). Every tensor, the router too, is written in the export dtype: transformers keeps no Mixtral weight in float32.
"""

from __future__ import annotations

import torch

from tools.hf.moe_names import SELECTION_BIAS, MoENames

MIXTRAL = MoENames(
    per_layer={"mlp.router.weight": "block_sparse_moe.gate.weight"}, experts="block_sparse_moe.experts",
    linears={"gate": "w1", "up": "w3", "down": "w2"},
    kept_dtype=(SELECTION_BIAS,),  # what the --verify reference keeps in its stored dtype (not written at all)
    without_bias="MixtralForCausalLM selects experts by the softmax scores alone (no selection bias)")

# this module's names are MIXTRAL's (tools/convert_hf.py uses this module or tools/hf/moe_names.py alike)
KEPT_DTYPE, hf_entries, hf_tensors, mapping_table = (
    MIXTRAL.kept_dtype, MIXTRAL.hf_entries, MIXTRAL.hf_tensors, MIXTRAL.mapping_table)
from_hf, their_name, is_expert, stack_experts = (
    MIXTRAL.from_hf, MIXTRAL.their_name, MIXTRAL.is_expert, MIXTRAL.stack_experts)


def selection_biases(n_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Our zero selection biases of every MoE layer (what a Mixtral router computes without one)."""
    return {f"layers.{i}.{SELECTION_BIAS}": torch.zeros(num_experts) for i in range(n_layers)}
