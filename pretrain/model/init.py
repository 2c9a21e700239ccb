"""Initial parameter values that depend only on the seed and the parameter's name, never on the order in which
parameters are created or on which rank asks: any process can compute any parameter's initial value alone, so a
rank of a sharded model initializes just its own shards and still matches the one-process model exactly."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InitRule:
    """normal(0, std), zeros (std 0: LoRA's B), or ones (std None: norm weights)."""

    shape: tuple[int, ...]
    std: float | None


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(name: str, rule: InitRule, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole initial tensor of parameter `name` (on the CPU)."""
    if rule.std is None:
        return torch.ones(rule.shape, dtype=dtype)
    if rule.std == 0:
        return torch.zeros(rule.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(rule.shape, generator=generator).mul_(rule.std).to(dtype)
