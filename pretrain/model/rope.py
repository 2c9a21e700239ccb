"""Rotary position embeddings in the "rotate half" layout (as Hugging Face Llama stores q/k)."""

from __future__ import annotations

import torch

from pretrain.model.config import RopeConfig


def rope_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, one per rotated pair; context-extension scalings (PI, NTK, YaRN, Llama-3) go here."""
    if rope.scaling != "none":
        raise ValueError(f"unknown RoPE scaling '{rope.scaling}'")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / rope.theta**exponents).float()


def rope_cos_sin(inv_freq: torch.Tensor, seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
