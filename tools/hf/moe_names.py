"""Tensor names of an MoE model: ours (pretrain/model/moe.py) -> the per-expert layout of Hugging Face MoE checkpoints
(Glm4MoeForCausalLM, DeepSeek-V3), which transformers fuses into its own stacked experts on loading.

Attention, norms, embeddings and the dense layers' MLPs keep Llama's names (tools/hf/names.py). Our stacked experts
`mlp.experts.{gate,up}` [E, d, h] and `mlp.experts.down` [E, h, d] (used as x @ W[e]) become E linears each,
`mlp.experts.{e}.{gate,up,down}_proj.weight`, [h, d] and [d, h] (used as x @ Wᵀ): expert e's slice, transposed. The
router's weight and selection bias stay in their stored dtype (float32: transformers keeps them in float32 too).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from tools.hf import ConversionError
from tools.hf.names import mapping_table as dense_mapping_table
from tools.hf.names import to_hf as dense_to_hf
from tools.hf.safetensors_folder import LazyTensor

MOE_PER_LAYER = {
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "mlp.shared.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "mlp.shared.down_proj.weight": "mlp.shared_experts.down_proj.weight",
}
MLA_PER_LAYER = {f"attn.{name}.weight": f"self_attn.{name}.weight" for name in (
    "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")}
STACKED = {"mlp.experts.gate": "gate_proj", "mlp.experts.up": "up_proj", "mlp.experts.down": "down_proj"}
KEPT_DTYPE = ("mlp.router.weight", "mlp.router.expert_bias")
_OURS = re.compile(r"layers\.(\d+)\.(.+)")


def hf_entries(name: str, shape: tuple[int, ...], dtype: torch.dtype,
               export_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(their name, dtype, shape) of each tensor our tensor `name` becomes, in the order `hf_tensors` yields them."""
    match = _OURS.fullmatch(name)
    part = match[2] if match else ""
    written = dtype if export_dtype is None or part in KEPT_DTYPE else export_dtype
    if part in STACKED:
        experts, rows, cols = shape
        return [(f"model.layers.{match[1]}.mlp.experts.{e}.{STACKED[part]}.weight", written, (cols, rows))
                for e in range(experts)]
    if part in MOE_PER_LAYER or part in MLA_PER_LAYER:
        theirs = MOE_PER_LAYER.get(part) or MLA_PER_LAYER[part]
        return [(f"model.layers.{match[1]}.{theirs}", written, tuple(shape))]
    return [(dense_to_hf(name), written, tuple(shape))]


def hf_tensors(name: str, tensor: torch.Tensor, export_dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensor as the tensors `hf_entries` names (expert slices transposed and made contiguous one at a time)."""
    entries = hf_entries(name, tuple(tensor.shape), tensor.dtype, export_dtype)
    match = _OURS.fullmatch(name)
    if match and match[2] in STACKED:
        for e, (hf_name, dtype, _) in enumerate(entries):
            yield hf_name, tensor[e].t().to(dtype).contiguous()
        return
    (hf_name, dtype, _), = entries
    yield hf_name, tensor.to(dtype)


def mapping_table(tie_embeddings: bool, mla: bool = False) -> dict[str, str]:
    """Our name -> theirs, `{i}` for the layer and `{e}` for the expert (for conversion.json and the README)."""
    table = {k: v for k, v in dense_mapping_table().items() if k != "lm_head.weight" or not tie_embeddings}
    if mla:
        table = {k: v for k, v in table.items() if ".attn.k_proj" not in k and ".attn.v_proj" not in k}
        table |= {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{theirs}" for ours, theirs in MLA_PER_LAYER.items()}
    table |= {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{theirs}" for ours, theirs in MOE_PER_LAYER.items()}
    table |= {f"layers.{{i}}.{ours}[e]ᵀ": f"model.layers.{{i}}.mlp.experts.{{e}}.{theirs}.weight"
              for ours, theirs in STACKED.items()}
    return table


_FROM_HF_MOE = {theirs: ours for ours, theirs in (MOE_PER_LAYER | MLA_PER_LAYER).items()}
_THEIR_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_THEIR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def from_hf(name: str) -> str | None:
    """Our name of a router, shared-expert or MLA tensor, None for another (per-expert ones: `stack_experts`)."""
    match = _THEIR_LAYER.fullmatch(name)
    if match and match[2] in _FROM_HF_MOE:
        return f"layers.{match[1]}.{_FROM_HF_MOE[match[2]]}"
    return None


def their_name(name: str) -> str:
    """Their name of our tensor `name` (a stacked one: of its first expert), for error messages."""
    match = _OURS.fullmatch(name)
    if match and match[2] in STACKED:
        return f"model.layers.{match[1]}.mlp.experts.0.{STACKED[match[2]]}.weight"
    if match and (match[2] in MOE_PER_LAYER or match[2] in MLA_PER_LAYER):
        return f"model.layers.{match[1]}.{(MOE_PER_LAYER | MLA_PER_LAYER)[match[2]]}"
    try:
        return dense_to_hf(name)
    except ConversionError:  # e.g. an MTP module's tensor: named as ours
        return name


def stack_experts(tensors: dict[str, torch.Tensor], num_experts: int, where: str, pattern: re.Pattern = _THEIR_EXPERT,
                  parts: dict[str, str] | None = None,
                  their_format: str = "model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight",
                  ) -> tuple[dict[str, LazyTensor], list[str]]:
    """Our stacked expert tensors from their per-expert linears (`tensors`: their name -> tensor, the per-expert
    ones), each expert's weight transposed, stacked only when asked for (one at a time when streamed); and the
    per-expert names that are left over (unexpected). `pattern` matches their names (groups: layer, expert, part),
    `parts` maps their part to ours (gate, up, down; None: the same) and `their_format` writes their names back."""
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = pattern.fullmatch(name)
        groups.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
    stacked, left_over = {}, []
    for (layer, part), experts in sorted(groups.items()):
        if sorted(experts) != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(experts))
            if missing:
                their = their_format.format(layer=layer, e="{e}", part=part)
                raise ConversionError(f"{where}: layer {layer} lacks the {their} of experts {missing[:6]}")
            left_over += [their_format.format(layer=layer, e=e, part=part) for e in sorted(experts)
                          if e >= num_experts]
        first = experts[0]
        stacked[f"layers.{layer}.mlp.experts.{(parts or {}).get(part, part)}"] = LazyTensor(
            (num_experts, *reversed(first.shape)), first.dtype,
            lambda experts=experts: torch.stack([experts[e].t() for e in range(num_experts)]))
    return stacked, left_over


def is_expert(name: str) -> bool:
    return _THEIR_EXPERT.fullmatch(name) is not None
