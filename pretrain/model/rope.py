"""Rotary position embeddings in the "rotate half" layout (as Hugging Face Llama stores q/k), and the
context-extension scalings of their inverse frequencies, computed in float64 and stored in float32 (a bf16
`inv_freq` garbles long-range phases).

With dim rotated dimensions, base θ and pair i (0 ≤ i < dim/2): θ_i = θ^(−2i/dim), wavelength λ_i = 2π/θ_i;
L is `original_max_seq_len`, s is `factor`.
  linear   position interpolation (Chen et al. 2023): θ_i / s.
  ntk      static NTK-aware: the base raised to θ·s^(dim/(dim−2)).
  dynamic  NTK by the current length n (> L): base θ·(s·n/L − (s−1))^(dim/(dim−2)); plain RoPE up to L.
  yarn     (Peng et al. 2023): pair i keeps θ_i where it turns more than β_fast times over L, is interpolated
           (θ_i / s) where fewer than β_slow times, with a linear ramp between; cos and sin are multiplied by the
           attention factor 0.1·ln(s) + 1 (or mscale's ratio), and MLA's softmax scale by
           (0.1·mscale_all_dim·ln(s) + 1)² (DeepSeek-V3: ≈1.87 at s = 40).
  llama3   (Llama 3.1): λ_i > L/low_freq_factor interpolated, λ_i < L/high_freq_factor kept, a smooth blend
           between.
"""

from __future__ import annotations

import math

import torch

from pretrain.model.config import RopeConfig

SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


def _plain(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(rope: RopeConfig, dim: int) -> torch.Tensor:
    def pair_turning(rotations: float) -> float:  # the pair index that turns `rotations` times over L
        return dim * math.log(rope.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = pair_turning(rope.beta_fast), pair_turning(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if high == low else high
    interpolated = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    base = _plain(rope.theta, dim)
    return base / rope.factor * interpolated + base * (1 - interpolated)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    base = _plain(rope.theta, dim)
    wavelength = 2 * math.pi / base
    long_wavelength = rope.original_max_seq_len / rope.low_freq_factor
    short_wavelength = rope.original_max_seq_len / rope.high_freq_factor
    blend = (rope.original_max_seq_len / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - blend) * base / rope.factor + blend * base
    scaled = torch.where(wavelength > long_wavelength, base / rope.factor, base)
    between = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(between, smoothed, scaled)


def rope_frequencies(rope: RopeConfig, dim: int, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (float32), one per rotated pair of `dim`; `seq_len` is the current length, which only
    `dynamic` depends on."""
    exponent = dim / (dim - 2) if dim > 2 else 1.0
    if rope.scaling == "none":
        inv_freq = _plain(rope.theta, dim)
    elif rope.scaling == "linear":
        inv_freq = _plain(rope.theta, dim) / rope.factor
    elif rope.scaling == "ntk":
        inv_freq = _plain(rope.theta * rope.factor**exponent, dim)
    elif rope.scaling == "dynamic":
        length = max(seq_len or 0, rope.original_max_seq_len)
        growth = rope.factor * length / rope.original_max_seq_len - (rope.factor - 1)
        inv_freq = _plain(rope.theta * growth**exponent, dim)
    elif rope.scaling == "yarn":
        inv_freq = _yarn(rope, dim)
    elif rope.scaling == "llama3":
        inv_freq = _llama3(rope, dim)
    else:
        raise ValueError(f"unknown RoPE scaling '{rope.scaling}', expected one of {SCALINGS}")
    return inv_freq.float()


def rope_attention_factor(rope: RopeConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's temperature); 1 for the other scalings."""
    if rope.scaling != "yarn":
        return 1.0
    if rope.attention_factor:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def mla_softmax_multiplier(rope: RopeConfig) -> float:
    """DeepSeek's extra factor on MLA's softmax scale under YaRN with `mscale_all_dim` (1 otherwise)."""
    if rope.scaling != "yarn" or not rope.mscale_all_dim:
        return 1.0
    return _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2


def rope_cos_sin(inv_freq: torch.Tensor, seq_len: int, offset: int = 0,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_slice(cos: torch.Tensor, sin: torch.Tensor, start: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for `seq` positions from `start`, for q/k of [batch, heads, seq, dim]: a [positions, dim] table is
    sliced; per-token values [batch, positions, dim] (positions restarting per document) get a heads axis."""
    if cos.dim() == 3:
        return cos[:, start : start + seq].unsqueeze(1), sin[:, start : start + seq].unsqueeze(1)
    return cos[start : start + seq], sin[start : start + seq]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
