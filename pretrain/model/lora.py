"""LoRA (Hu et al., 2021): a frozen linear W plus a trainable low-rank update, y = x Wᵀ + (alpha/r) · B A x.

A (r × in) starts random and B (out × r) at zero, so an adapted model computes exactly what its base does until
the first update. The adapted linear keeps its base weight under the same name (`….q_proj.weight`), so the base
checkpoint loads unchanged, and adds `….q_proj.lora_a` / `….q_proj.lora_b`. `merge_lora` folds the update into
the weights and gives back a plain model. Tensor parallelism shards adapters with their base layer
(`parallel/tensor/layers.py`) using `lora_delta` below.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.init import InitRule

ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass
class LoraConfig:
    """`rank` 0: no adapters (full fine-tuning). `targets`: glob patterns matched against module names of the
    plain model (`layers.0.attn.q_proj`); the defaults adapt every attention and dense-MLP projection."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["*.attn.*_proj", "*.mlp.*_proj"])

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
               dropout: nn.Module) -> torch.Tensor:
    """scale · B A dropout(x), for any slices of A and B that fit each other (tensor-parallel shards too)."""
    return F.linear(F.linear(dropout(x), lora_a), lora_b) * scale


class LoRALinear(nn.Module):
    """A bias-free linear layer with a low-rank adapter; `enabled = False` computes the base layer alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA adapts the model's bias-free linear layers only")
        self.weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        return y + lora_delta(x, self.lora_a, self.lora_b, self.scale, self.dropout)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


def _targets(model: nn.Module, patterns: list[str]) -> list[str]:
    return [name for name, module in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, InitRule]:
    """Replace every linear layer whose name matches `cfg.targets` by a `LoRALinear` (also on `meta`); returns the
    adapters' initialization rules by parameter name (A: Normal(0, 1/sqrt(in)), B: zeros)."""
    names = _targets(model, cfg.targets)
    if not names:
        raise ValueError(f"lora.targets {cfg.targets} match no module of the model (names look like "
                         "'layers.0.attn.q_proj')")
    rules: dict[str, InitRule] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"lora.targets: '{name}' is a {type(module).__name__}, not a linear layer; LoRA adapts "
                             "the attention and dense MLP projections (MoE experts are stacked tensors)")
        if name == "lm_head" or ".mlp.shared." in f".{name}.":
            raise ValueError(f"lora.targets: '{name}' cannot take an adapter (the output head and the MoE shared "
                             "experts are not adapted); narrow the patterns")
        parent, _, attr = name.rpartition(".")
        adapted = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout)
        setattr(model.get_submodule(parent) if parent else model, attr, adapted)
        rules[f"{name}.lora_a"] = InitRule((cfg.rank, module.in_features), 1.0 / math.sqrt(module.in_features))
        rules[f"{name}.lora_b"] = InitRule((module.out_features, cfg.rank), 0.0)
    return rules


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def freeze_base(model: nn.Module) -> list[str]:
    """Only the adapters train; returns their names."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
        if is_adapter(name):
            trainable.append(name)
    return trainable


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the base model, e.g. DPO's reference)."""
    for module in model.modules():
        if hasattr(module, "lora_a") and hasattr(module, "enabled"):
            module.enabled = enabled


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain `nn.Linear` back: the model of the base's shape."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False,
                               device=module.weight.device, dtype=module.weight.dtype)
            linear.weight.copy_(module.merged_weight())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, linear)
    return model
