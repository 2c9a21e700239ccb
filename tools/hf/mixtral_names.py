"""Tensor names of a softmax top-k MoE model: ours (pretrain/model/moe.py) -> the checkpoint layout of
MixtralForCausalLM, the one Mistral's published checkpoints have and transformers' `save_pretrained` writes (on
loading, transformers renames `block_sparse_moe` to `mlp` and fuses each layer's experts into `gate_up_proj` and
`down_proj`).

Attention, norms and embeddings keep Llama's names (tools/hf/names.py). The router `mlp.router.weight` becomes
`block_sparse_moe.gate.weight`; our stacked experts `mlp.experts.{gate,up}` [E, d, h] and `mlp.experts.down`
[E, h, d] (used as x @ W[e]) become E linears each, `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (w1 gate,
w3 up, w2 down; [h, d] and [d, h], used as x @ Wᵀ): expert e's slice, transposed. Our selection bias
`mlp.router.expert_bias` has no counterpart: Mixtral selects by the softmax scores alone, so it is written nowhere
and must be zero (`hf_tensors` refuses another; import-hf sets it to zero). Every tensor, the router too, is
written in the export dtype: transformers keeps no Mixtral weight in float32.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from tools.hf import ConversionError, moe_names
from tools.hf.names import mapping_table as dense_mapping_table
from tools.hf.names import to_hf as dense_to_hf
from tools.hf.safetensors_folder import LazyTensor

ROUTER = {"mlp.router.weight": "block_sparse_moe.gate.weight"}
STACKED = {"mlp.experts.gate": "w1", "mlp.experts.up": "w3", "mlp.experts.down": "w2"}
SELECTION_BIAS = "mlp.router.expert_bias"  # no counterpart: must be zero
KEPT_DTYPE = (SELECTION_BIAS,)  # what the --verify reference keeps in its stored dtype (not written at all)
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_THEIR_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_THEIR_FORMAT = "model.layers.{layer}.block_sparse_moe.experts.{e}.{part}.weight"
_FROM_THEIR_PART = {theirs: ours.removeprefix("mlp.experts.") for ours, theirs in STACKED.items()}


def hf_entries(name: str, shape: tuple[int, ...], dtype: torch.dtype,
               export_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(their name, dtype, shape) of each tensor our tensor `name` becomes (none for the selection bias), in the
    order `hf_tensors` yields them."""
    match = _OURS.fullmatch(name)
    part = match[2] if match else ""
    written = export_dtype or dtype
    if part == SELECTION_BIAS:
        return []
    if part in STACKED:
        experts, rows, cols = shape
        return [(_THEIR_FORMAT.format(layer=match[1], e=e, part=STACKED[part]), written, (cols, rows))
                for e in range(experts)]
    if part in ROUTER:
        return [(f"model.layers.{match[1]}.{ROUTER[part]}", written, tuple(shape))]
    return [(dense_to_hf(name), written, tuple(shape))]


def hf_tensors(name: str, tensor: torch.Tensor, export_dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensor as the tensors `hf_entries` names (expert slices transposed and made contiguous one at a time); a
    nonzero selection bias is an error (Mixtral would choose other experts)."""
    match = _OURS.fullmatch(name)
    if match and match[2] == SELECTION_BIAS:
        if tensor.any():
            raise ConversionError(f"{name} is nonzero: MixtralForCausalLM selects experts by the softmax scores "
                                  "alone (no selection bias)")
        return
    entries = hf_entries(name, tuple(tensor.shape), tensor.dtype, export_dtype)
    if match and match[2] in STACKED:
        for e, (hf_name, dtype, _) in enumerate(entries):
            yield hf_name, tensor[e].t().to(dtype).contiguous()
        return
    (hf_name, dtype, _), = entries
    yield hf_name, tensor.to(dtype)


def mapping_table(tie_embeddings: bool) -> dict[str, str]:
    """Our name -> theirs, `{i}` for the layer and `{e}` for the expert (for conversion.json and the README)."""
    table = {k: v for k, v in dense_mapping_table().items() if k != "lm_head.weight" or not tie_embeddings}
    table |= {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{theirs}" for ours, theirs in ROUTER.items()}
    table |= {f"layers.{{i}}.{ours}[e]ᵀ": f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{theirs}.weight"
              for ours, theirs in STACKED.items()}
    table[f"layers.{{i}}.{SELECTION_BIAS}"] = "(none: must be zero; zero on import)"
    return table


_FROM_HF = {theirs: ours for ours, theirs in ROUTER.items()}
_THEIR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def from_hf(name: str) -> str | None:
    """Our name of a router tensor, None for another (per-expert ones: `stack_experts`)."""
    match = _THEIR_LAYER.fullmatch(name)
    if match and match[2] in _FROM_HF:
        return f"layers.{match[1]}.{_FROM_HF[match[2]]}"
    return None


def their_name(name: str) -> str:
    """Their name of our tensor `name` (a stacked one: of its first expert), for error messages."""
    match = _OURS.fullmatch(name)
    if match and match[2] in STACKED:
        return _THEIR_FORMAT.format(layer=match[1], e=0, part=STACKED[match[2]])
    if match and match[2] in ROUTER:
        return f"model.layers.{match[1]}.{ROUTER[match[2]]}"
    try:
        return dense_to_hf(name)
    except ConversionError:
        return name


def is_expert(name: str) -> bool:
    return _THEIR_EXPERT.fullmatch(name) is not None


def stack_experts(tensors: dict[str, torch.Tensor], num_experts: int,
                  where: str) -> tuple[dict[str, LazyTensor], list[str]]:
    """Our stacked experts from their w1/w3/w2 linears (transposed, stacked when written), and the per-expert names
    left over; see moe_names.stack_experts."""
    return moe_names.stack_experts(tensors, num_experts, where, _THEIR_EXPERT, _FROM_THEIR_PART, _THEIR_FORMAT)


def selection_biases(n_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Our zero selection biases of every MoE layer (what a Mixtral router computes without one)."""
    return {f"layers.{i}.{SELECTION_BIAS}": torch.zeros(num_experts) for i in range(n_layers)}
