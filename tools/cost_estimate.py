"""`pretrain cost estimate CONFIG --tokens T --gpu G --gpus N`: training FLOPs, GPU-hours, wall-clock days, dollars
and (optionally) energy and CO₂ of training a config's model on T tokens, before running it.

FLOPs count the convention of `pretrain/model/flops.py`, the same the trainer's MFU and the accounting ledger use:
per token, 6 × the weights that take part in a matmul (attention and feed-forward projections; MoE: the router, the
token's top-k routed experts and the shared experts; the LM head; the MTP modules) plus the attention scores, 6 ×
n_layers × n_heads × (d_qk + d_v) × context (QK^T and AV: 12·L·d_attn·T for GQA), with context the full sequence
(not halved for the causal mask, as PaLM's and Chinchilla's 6N + 12·L·d·T) or the sliding window where one caps
it. The embedding lookup and the norms are not counted.

GPU-hours = FLOPs / (peak × MFU) / 3600, independent of the GPU count; wall-clock = GPU-hours / N, i.e. the MFU
is assumed to hold at that scale. Energy = GPU-hours × TDP × PUE (the GPUs at their rated board power, the rest of
the data centre through the PUE); CO₂ = energy × grid intensity.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cluster.gpu_specs import GPU, lookup
from pretrain.model.config import ModelConfig
from pretrain.model.flops import count_parameters, flops_per_token, matmul_parameters

DEFAULT_MFU = 0.40  # a well-tuned dense run on H100s: Llama 3 405B reported 38-43% (BF16) on 8-16K GPUs
PRECISIONS = ("bf16", "fp8")
CONVENTION = ("FLOPs/token = 6 x matmul weights per token (attention, MLP or MoE router + top-k routed + shared "
              "experts, LM head, MTP) + 6 x n_layers x n_heads x (d_qk + d_v) x context (QK^T and AV over the full "
              "sequence, not halved for the causal mask; a sliding window caps it); embedding lookup and norms "
              "excluded")
SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12, "P": 10**15}


def parse_tokens(text: str) -> int:
    """A token count: 15.6T, 14.8T, 2B, 500M, 10K, 1.5e12 or 123456 (decimal suffixes: K M B/G T P)."""
    raw = text.strip().replace(",", "").replace("_", "")
    scale = SUFFIXES.get(raw[-1:].upper(), 1)
    number = raw[:-1] if scale > 1 else raw
    try:
        value = Decimal(number) * scale
    except InvalidOperation:
        raise ValueError(f"'{text}' is not a token count (e.g. 15.6T, 2B, 500M, 1.5e12)") from None
    if not value.is_finite() or value <= 0 or value != value.to_integral_value():
        raise ValueError(f"'{text}' is not a positive whole number of tokens")
    return int(value)


@dataclass
class Flops:
    """Training FLOPs of `tokens` tokens of `seq_len`-token sequences, split as the convention adds them."""

    tokens: int
    seq_len: int
    matmul_parameters: int  # the N of 6N
    parameters: int  # all of the model's (embedding and MTP included)
    active_parameters: int  # one token's (MoE: its routed experts)
    per_token: float
    dense_per_token: float  # 6 x matmul_parameters
    attention_per_token: float
    mtp_depth: int = 0

    @property
    def total(self) -> float:
        return self.per_token * self.tokens

    @property
    def dense_total(self) -> float:
        return self.dense_per_token * self.tokens


def training_flops(model: ModelConfig, seq_len: int, tokens: int) -> Flops:
    per_token = float(flops_per_token(model, seq_len))
    dense = float(6 * matmul_parameters(model))
    return Flops(tokens=tokens, seq_len=seq_len, matmul_parameters=matmul_parameters(model),
                 parameters=count_parameters(model), active_parameters=count_parameters(model, active=True),
                 per_token=per_token, dense_per_token=dense, attention_per_token=per_token - dense,
                 mtp_depth=model.mtp_depth)


def gpu_hours(flops: float, peak: float, mfu: float) -> float:
    """Accelerator-hours that `flops` take at `mfu` of a `peak` FLOP/s accelerator."""
    return flops / (peak * mfu) / 3600


@dataclass
class Energy:
    pue: float
    tdp_watts: float
    kwh: float
    grid_kgco2_per_kwh: float | None
    tonnes_co2: float | None


def energy(hours: float, tdp_watts: float, pue: float, grid_kgco2_per_kwh: float | None) -> Energy:
    kwh = hours * tdp_watts / 1000 * pue
    co2 = None if grid_kgco2_per_kwh is None else kwh * grid_kgco2_per_kwh / 1000
    return Energy(pue, tdp_watts, kwh, grid_kgco2_per_kwh, co2)


@dataclass
class Estimate:
    config: str
    flops: Flops
    gpu: GPU
    gpus: int
    precision: str
    peak_flops: float
    mfu: float
    price_per_gpu_hour: float | None
    energy: Energy | None

    @property
    def gpu_hours(self) -> float:
        return gpu_hours(self.flops.total, self.peak_flops, self.mfu)

    @property
    def wall_days(self) -> float:
        return self.gpu_hours / self.gpus / 24

    @property
    def dollars(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    def to_dict(self) -> dict[str, Any]:
        f = self.flops
        return {
            "config": self.config, "convention": CONVENTION, "tokens": f.tokens, "seq_len": f.seq_len,
            "parameters": f.parameters, "active_parameters": f.active_parameters,
            "matmul_parameters": f.matmul_parameters, "flops_per_token": f.per_token,
            "dense_flops_per_token": f.dense_per_token, "attention_flops_per_token": f.attention_per_token,
            "training_flops": f.total, "dense_training_flops": f.dense_total,
            "gpu": self.gpu.name, "gpu_description": self.gpu.description, "gpu_source": self.gpu.source,
            "gpus": self.gpus, "precision": self.precision, "peak_flops": self.peak_flops, "mfu": self.mfu,
            "gpu_hours": self.gpu_hours, "wall_clock_days": self.wall_days,
            "price_per_gpu_hour": self.price_per_gpu_hour, "dollars": self.dollars,
            "energy": None if self.energy is None else asdict(self.energy),
        }


def estimate(config: str | Path, tokens: int, gpu: str, gpus: int, mfu: float = DEFAULT_MFU,
             precision: str = "bf16", price_per_gpu_hour: float | None = None, pue: float | None = None,
             grid_kgco2_per_kwh: float | None = None, seq_len: int = 0) -> Estimate:
    """Raises ConfigError naming the option for anything wrong in the inputs."""
    from pretrain.config import ConfigError, load_config

    spec = _option("--gpu", lambda: lookup(gpu))
    if precision not in PRECISIONS:
        raise ConfigError("--precision", f"'{precision}': choose from {', '.join(PRECISIONS)}")
    peak = _option("--precision", lambda: spec.peak(precision))
    if gpus < 1:
        raise ConfigError("--gpus", f"must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"a fraction of the peak in (0, 1], got {mfu}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise ConfigError("--price-per-gpu-hour", f"must not be negative, got {price_per_gpu_hour}")
    power = energy_option(spec.tdp_watts, pue, grid_kgco2_per_kwh)
    cfg = load_config(config, check_paths=False)
    flops = training_flops(cfg.model, seq_len or cfg.data.seq_len, tokens)
    result = Estimate(str(config), flops, spec, gpus, precision, peak, mfu, price_per_gpu_hour, None)
    if power is not None:
        result.energy = energy(result.gpu_hours, *power)
    return result


def energy_option(tdp_watts: float, pue: float | None, grid: float | None) -> tuple[float, float, float | None] | None:
    """(tdp, pue, grid) when an energy line was asked for (--pue or --grid-kgco2-per-kwh; PUE 1.0 if only the grid
    intensity is given), else None."""
    from pretrain.config import ConfigError

    if pue is None and grid is None:
        return None
    if pue is not None and pue < 1:
        raise ConfigError("--pue", f"power usage effectiveness is at least 1.0, got {pue}")
    if grid is not None and grid < 0:
        raise ConfigError("--grid-kgco2-per-kwh", f"must not be negative, got {grid}")
    return tdp_watts, 1.0 if pue is None else pue, grid


def _option(option: str, make):
    from pretrain.config import ConfigError

    try:
        return make()
    except ValueError as exc:
        raise ConfigError(option, str(exc)) from None


# -- formatting ------------------------------------------------------------------------------------------------
def count(n: float) -> str:
    """15.6T, 405.85B, 2.79M: three to four significant figures with a decimal suffix."""
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.4g}{suffix}"
    return f"{n:,.4g}"


def quantity(h: float) -> str:
    """Hours, kWh, tonnes: whole above 1000, two decimals above 1, four significant figures below."""
    return f"{h:,.0f}" if h >= 1000 else f"{h:,.2f}" if h >= 1 else f"{h:.4g}"


def energy_lines(e: Energy, hours: float, unit: str = "GPU-hours") -> list[str]:
    lines = [f"{quantity(e.kwh)} kWh = {quantity(hours)} {unit} x {e.tdp_watts:,.0f} W (TDP) x PUE {e.pue:g}"]
    if e.tonnes_co2 is not None:
        lines.append(f"{quantity(e.tonnes_co2)} t CO2 at {e.grid_kgco2_per_kwh:g} kg CO2/kWh (grid intensity as given)")
    return lines


def format_estimate(est: Estimate, fmt: str = "md") -> str:
    if fmt == "json":
        return json.dumps(est.to_dict(), indent=1)
    f = est.flops
    share = f.attention_per_token / f.per_token if f.per_token else 0.0
    rows = [
        ("model", f"{count(f.parameters)} parameters{' (MTP modules included)' if f.mtp_depth else ''}, "
                  f"{count(f.active_parameters)} active per token; "
                  f"{count(f.matmul_parameters)} in matmuls (the N of 6N)"),
        ("tokens", f"{count(f.tokens)} ({f.tokens:,}) in sequences of {f.seq_len:,}"),
        ("FLOPs per token", f"{f.per_token:.4g} = 6N {f.dense_per_token:.4g} + attention {f.attention_per_token:.4g} "
                            f"({share:.1%})"),
        ("training FLOPs", f"{f.total:.4g} (6N alone: {f.dense_total:.4g})"),
        ("hardware", f"{est.gpus:,} x {est.gpu.name} ({est.gpu.description}): {est.peak_flops / 1e12:,.1f} TFLOP/s "
                     f"dense {est.precision} peak each; source: {est.gpu.source}"),
        ("MFU", f"{est.mfu:g} (assumed{'; the default' if est.mfu == DEFAULT_MFU else ''})"),
        ("GPU-hours", f"{quantity(est.gpu_hours)} = FLOPs / (peak x MFU) / 3600"),
        ("wall clock", f"{est.wall_days:,.1f} days on {est.gpus:,} GPUs (the MFU held at that scale)"),
        ("cost", "n/a (give --price-per-gpu-hour)" if est.dollars is None else
                 f"${est.dollars:,.0f} at ${est.price_per_gpu_hour:,.2f}/GPU-hour"),
    ]
    if est.energy is not None:
        rows.append(("energy", "; ".join(energy_lines(est.energy, est.gpu_hours))))
    lines = [f"## Cost estimate: {est.config}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", f"Convention: {CONVENTION}."]
    return "\n".join(lines)


def mfu_for_hours(flops: float, peak: float, hours: float) -> float:
    """The MFU at which `flops` take `hours` accelerator-hours (gpu_hours solved for the MFU)."""
    if hours <= 0 or peak <= 0:
        return math.nan
    return flops / (peak * hours * 3600)
