"""Tensor names of an MoE model: ours (pretrain/model/moe.py) -> the per-expert layout of Hugging Face MoE checkpoints,
which transformers fuses into its own stacked experts on loading. One table, `MoENames`, serves every architecture;
its fields are what differs: `DEEPSEEK` here (Glm4MoeForCausalLM, DeepSeek-V3), `MIXTRAL` in tools/hf/mixtral_names.py.

Attention, norms, embeddings and the dense layers' MLPs keep Llama's names (tools/hf/names.py). Our stacked experts
`mlp.experts.{gate,up}` [E, d, h] and `mlp.experts.down` [E, h, d] (used as x @ W[e]) become E linears each,
`{experts}.{e}.{linear}.weight`, [h, d] and [d, h] (used as x @ Wᵀ): expert e's slice, transposed. DEEPSEEK's are
`mlp.experts.{e}.{gate,up,down}_proj`; its router's weight and selection bias stay in their stored dtype (float32:
transformers keeps them in float32 too).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from tools.hf import ConversionError
from tools.hf.names import mapping_table as dense_mapping_table
from tools.hf.names import to_hf as dense_to_hf
from tools.hf.safetensors_folder import LazyTensor

SELECTION_BIAS = "mlp.router.expert_bias"
MLA_PER_LAYER = {f"attn.{name}.weight": f"self_attn.{name}.weight" for name in (
    "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")}
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_THEIR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class MoENames:
    """Where an architecture keeps an MoE layer's tensors, below `model.layers.{i}.`."""

    per_layer: dict[str, str]  # ours -> theirs: the router, selection bias, shared experts that they have
    experts: str  # their per-expert linears: `{experts}.{e}.{linear}.weight`
    linears: dict[str, str]  # our stacked part (gate, up, down) -> their linear
    kept_dtype: tuple[str, ...]  # ours written in their stored dtype, not the export dtype
    mla: dict[str, str] = field(default_factory=dict)  # MLA's tensors (mapping_table: only with mla=True)
    without_bias: str = ""  # no SELECTION_BIAS in per_layer: why a nonzero one is refused (a zero one is left out)

    @cached_property
    def _named(self) -> dict[str, str]:
        return self.per_layer | self.mla

    @cached_property
    def _stacked(self) -> dict[str, str]:
        return {f"mlp.experts.{part}": linear for part, linear in self.linears.items()}

    @cached_property
    def _their_expert(self) -> re.Pattern:
        linears = "|".join(map(re.escape, self.linears.values()))
        return re.compile(rf"model\.layers\.(\d+)\.{re.escape(self.experts)}\.(\d+)\.({linears})\.weight")

    @cached_property
    def _their_format(self) -> str:
        return f"model.layers.{{layer}}.{self.experts}.{{e}}.{{part}}.weight"

    @cached_property
    def _ours(self) -> dict[str, str]:
        return {theirs: ours for ours, theirs in self._named.items()}

    def hf_entries(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   export_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(their name, dtype, shape) of each tensor our tensor `name` becomes (none for a selection bias they lack),
        in the order `hf_tensors` yields them."""
        match = _OURS.fullmatch(name)
        part = match[2] if match else ""
        written = dtype if export_dtype is None or part in self.kept_dtype else export_dtype
        if part == SELECTION_BIAS and part not in self.per_layer:
            return []
        if part in self._stacked:
            experts, rows, cols = shape
            return [(self._their_format.format(layer=match[1], e=e, part=self._stacked[part]), written, (cols, rows))
                    for e in range(experts)]
        if part in self._named:
            return [(f"model.layers.{match[1]}.{self._named[part]}", written, tuple(shape))]
        return [(dense_to_hf(name), written, tuple(shape))]

    def hf_tensors(self, name: str, tensor: torch.Tensor,
                   export_dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Our tensor as the tensors `hf_entries` names (expert slices transposed and made contiguous one at a time);
        a nonzero selection bias where they have none is an error (they would choose other experts)."""
        match = _OURS.fullmatch(name)
        if match and match[2] == SELECTION_BIAS and SELECTION_BIAS not in self.per_layer:
            if tensor.any():
                raise ConversionError(f"{name} is nonzero: {self.without_bias}")
            return
        entries = self.hf_entries(name, tuple(tensor.shape), tensor.dtype, export_dtype)
        if match and match[2] in self._stacked:
            for e, (hf_name, dtype, _) in enumerate(entries):
                yield hf_name, tensor[e].t().to(dtype).contiguous()
            return
        (hf_name, dtype, _), = entries
        yield hf_name, tensor.to(dtype)

    def mapping_table(self, tie_embeddings: bool, mla: bool = False) -> dict[str, str]:
        """Our name -> theirs, `{i}` for the layer and `{e}` for the expert (for conversion.json and the README)."""
        table = {k: v for k, v in dense_mapping_table().items() if k != "lm_head.weight" or not tie_embeddings}
        if mla:
            table = {k: v for k, v in table.items() if ".attn.k_proj" not in k and ".attn.v_proj" not in k}
            table |= {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{theirs}" for ours, theirs in self.mla.items()}
        table |= {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{theirs}" for ours, theirs in self.per_layer.items()}
        table |= {f"layers.{{i}}.{ours}[e]ᵀ": f"model.layers.{{i}}.{self.experts}.{{e}}.{theirs}.weight"
                  for ours, theirs in self._stacked.items()}
        if SELECTION_BIAS not in self.per_layer:
            table[f"layers.{{i}}.{SELECTION_BIAS}"] = "(none: must be zero; zero on import)"
        return table

    def from_hf(self, name: str) -> str | None:
        """Our name of a router, shared-expert or MLA tensor, None for another (per-expert ones: `stack_experts`)."""
        match = _THEIR_LAYER.fullmatch(name)
        if match and match[2] in self._ours:
            return f"layers.{match[1]}.{self._ours[match[2]]}"
        return None

    def their_name(self, name: str) -> str:
        """Their name of our tensor `name` (a stacked one: of its first expert), for error messages."""
        match = _OURS.fullmatch(name)
        if match and match[2] in self._stacked:
            return self._their_format.format(layer=match[1], e=0, part=self._stacked[match[2]])
        if match and match[2] in self._named:
            return f"model.layers.{match[1]}.{self._named[match[2]]}"
        try:
            return dense_to_hf(name)
        except ConversionError:  # e.g. an MTP module's tensor, or a selection bias they lack: named as ours
            return name

    def is_expert(self, name: str) -> bool:
        return self._their_expert.fullmatch(name) is not None

    def stack_experts(self, tensors: dict[str, torch.Tensor], num_experts: int,
                      where: str) -> tuple[dict[str, LazyTensor], list[str]]:
        """Our stacked expert tensors from their per-expert linears (`tensors`: their name -> tensor, the per-expert
        ones), each expert's weight transposed, stacked only when asked for (one at a time when streamed); and the
        per-expert names that are left over (unexpected)."""
        ours = {linear: part for part, linear in self.linears.items()}
        groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            match = self._their_expert.fullmatch(name)
            groups.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
        stacked, left_over = {}, []
        for (layer, linear), experts in sorted(groups.items()):
            if sorted(experts) != list(range(num_experts)):
                missing = sorted(set(range(num_experts)) - set(experts))
                if missing:
                    their = self._their_format.format(layer=layer, e="{e}", part=linear)
                    raise ConversionError(f"{where}: layer {layer} lacks the {their} of experts {missing[:6]}")
                left_over += [self._their_format.format(layer=layer, e=e, part=linear) for e in sorted(experts)
                              if e >= num_experts]
            first = experts[0]
            stacked[f"layers.{layer}.mlp.experts.{ours[linear]}"] = LazyTensor(
                (num_experts, *reversed(first.shape)), first.dtype,
                lambda experts=experts: torch.stack([experts[e].t() for e in range(num_experts)]))
        return stacked, left_over


DEEPSEEK = MoENames(
    per_layer={
        "mlp.router.weight": "mlp.gate.weight",
        SELECTION_BIAS: "mlp.gate.e_score_correction_bias",
        "mlp.shared.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
        "mlp.shared.up_proj.weight": "mlp.shared_experts.up_proj.weight",
        "mlp.shared.down_proj.weight": "mlp.shared_experts.down_proj.weight",
    },
    experts="mlp.experts", linears={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    kept_dtype=("mlp.router.weight", SELECTION_BIAS), mla=MLA_PER_LAYER)

# this module's names are DEEPSEEK's (tools/convert_hf.py uses this module or tools/hf/mixtral_names.py alike)
KEPT_DTYPE, hf_entries, hf_tensors, mapping_table = (
    DEEPSEEK.kept_dtype, DEEPSEEK.hf_entries, DEEPSEEK.hf_tensors, DEEPSEEK.mapping_table)
from_hf, their_name, is_expert, stack_experts = (
    DEEPSEEK.from_hf, DEEPSEEK.their_name, DEEPSEEK.is_expert, DEEPSEEK.stack_experts)
