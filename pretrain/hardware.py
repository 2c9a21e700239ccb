"""Peak FLOP/s of the device, the denominator of MFU."""

from __future__ import annotations

import functools
import time

import torch

# Dense (non-sparse) peak tensor-core throughput, FLOP/s, from vendor datasheets.
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
}


def precision_key(precision: str) -> str:
    return "bf16" if precision == "bf16" else "fp32"


@functools.cache
def measured_matmul_flops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Best sustained square-matmul FLOP/s on this CPU: the practical peak MFU is measured against."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (and so training) untouched
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.matmul(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, precision: str) -> float:
    key = precision_key(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for model, peaks in GPU_PEAK_FLOPS.items():
            if model in name:
                return peaks[key]
    dtype = torch.bfloat16 if key == "bf16" else torch.float32
    return measured_matmul_flops(dtype)
