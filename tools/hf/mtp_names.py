"""Our multi-token prediction modules (pretrain/model/mtp.py) in DeepSeek-V3's published checkpoint layout: module k
is an extra decoder layer `model.layers.{n_layers + k}` after the main ones (config.json's `num_nextn_predict_layers`
says how many; transformers ignores them, inference engines use them for speculative decoding; import-hf reads
them back into our modules), holding

    enorm.weight                 our embed_norm (of the next token's embedding)
    hnorm.weight                 our hidden_norm (of the previous depth's hidden state)
    eh_proj.weight               our proj with its two input halves swapped: DeepSeek concatenates
                                 [enorm(embedding), hnorm(hidden)], we [hidden_norm(hidden), embed_norm(embedding)]
    shared_head.norm.weight      our norm before the output head
    shared_head.head.weight      a copy of the output head (lm_head, or the embedding when tied)
    embed_tokens.weight          a copy of the embedding
    input_layernorm.weight, self_attn.*, post_attention_layernorm.weight, mlp.*   the block, as a main layer's
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from tools.hf import moe_names

OWN = {"embed_norm.weight": "enorm.weight", "hidden_norm.weight": "hnorm.weight", "proj.weight": "eh_proj.weight",
       "norm.weight": "shared_head.norm.weight"}
_MTP = re.compile(r"mtp\.(\d+)\.(.+)")


class MTPLayout:
    def __init__(self, n_layers: int, depth: int, tie_embeddings: bool):
        self.n_layers, self.depth, self.tied = n_layers, depth, tie_embeddings

    def _copies(self, name: str) -> list[str]:
        """Their names of the MTP layers' copies of our tensor `name` (the shared embedding and head)."""
        layers = [f"model.layers.{self.n_layers + k}" for k in range(self.depth)]
        copies = []
        if name == "embed.weight":
            copies += [f"{layer}.embed_tokens.weight" for layer in layers]
        if name == "lm_head.weight" or (name == "embed.weight" and self.tied):
            copies += [f"{layer}.shared_head.head.weight" for layer in layers]
        return copies

    def hf_entries(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   export_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        match = _MTP.fullmatch(name)
        if match is None:
            entries = moe_names.hf_entries(name, shape, dtype, export_dtype)
            return entries + [(copy, entries[0][1], tuple(shape)) for copy in self._copies(name)]
        layer, part = self.n_layers + int(match[1]), match[2]
        if part in OWN:
            return [(f"model.layers.{layer}.{OWN[part]}", export_dtype or dtype, tuple(shape))]
        return moe_names.hf_entries(f"layers.{layer}.{part.removeprefix('block.')}", shape, dtype, export_dtype)

    def hf_tensors(self, name: str, tensor: torch.Tensor,
                   export_dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        match = _MTP.fullmatch(name)
        if match is None:
            yield from moe_names.hf_tensors(name, tensor, export_dtype)
            for copy in self._copies(name):
                yield copy, tensor.to(export_dtype or tensor.dtype)
            return
        layer, part = self.n_layers + int(match[1]), match[2]
        if part == "proj.weight":
            hidden_half, embed_half = tensor.chunk(2, dim=1)
            tensor = torch.cat([embed_half, hidden_half], dim=1)
        if part in OWN:
            yield f"model.layers.{layer}.{OWN[part]}", tensor.to(export_dtype or tensor.dtype)
            return
        yield from moe_names.hf_tensors(f"layers.{layer}.{part.removeprefix('block.')}", tensor, export_dtype)


_FROM_OWN = {theirs: ours for ours, theirs in OWN.items()}
_THEIR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def split_mtp_layers(stored: dict, n_layers: int, depth: int, tensor_of) -> tuple[dict, dict, dict]:
    """(our MTP modules' own tensors: enorm, hnorm, eh_proj (halves swapped back), shared_head.norm; their copies of
    the embedding and head by name; the rest of `stored`, the MTP layers' blocks staying under their layer names
    for `block_name`)."""
    own, copies, rest = {}, {}, {}
    for name, stored_tensor in stored.items():
        match = _THEIR_LAYER.fullmatch(name)
        layer = int(match[1]) if match else -1
        if not n_layers <= layer < n_layers + depth:
            rest[name] = stored_tensor
        elif match[2] in _FROM_OWN:
            tensor = tensor_of(stored_tensor)
            if match[2] == "eh_proj.weight":
                embed_half, hidden_half = tensor.chunk(2, dim=1)
                tensor = torch.cat([hidden_half, embed_half], dim=1)
            own[f"mtp.{layer - n_layers}.{_FROM_OWN[match[2]]}"] = tensor
        elif match[2] in ("embed_tokens.weight", "shared_head.head.weight"):
            copies[name] = stored_tensor
        else:
            rest[name] = stored_tensor
    return own, copies, rest


def block_name(n_layers: int):
    """Our name of a tensor mapped as `layers.{L}.X`: `mtp.{L - n_layers}.block.X` for an MTP layer's block."""
    def rename(name: str) -> str:
        match = _OUR_LAYER.fullmatch(name)
        if match and int(match[1]) >= n_layers:
            return f"mtp.{int(match[1]) - n_layers}.block.{match[2]}"
        return name
    return rename


def mapping_table() -> dict[str, str]:
    """Our MTP names -> theirs, `{k}` for the depth and L = n_layers + k (for conversion.json and the README)."""
    table = {f"mtp.{{k}}.{ours}": f"model.layers.{{L}}.{theirs}" for ours, theirs in OWN.items()}
    table["mtp.{k}.proj.weight"] += " (input halves swapped)"
    table |= {"mtp.{k}.block.<name>": "model.layers.{L}.<their name of layers.{i}.<name>>",
              "embed.weight (copy)": "model.layers.{L}.embed_tokens.weight",
              "lm_head.weight (copy; embed.weight when tied)": "model.layers.{L}.shared_head.head.weight"}
    return table
