"""Peak FLOP/s of the device, the denominator of MFU."""

from __future__ import annotations

import functools
import time

import torch

from cluster.gpu_specs import GPUS

# Dense (non-sparse) peak throughput, FLOP/s, by the substring of the device name that identifies the GPU, in
# matching order: cluster/gpu_specs.py's table (vendor datasheets, cited there), the one the cost tools read too.
GPU_PEAK_FLOPS = {name: {"bf16": gpu.bf16, "fp32": gpu.fp32} for name, gpu in GPUS.items()}


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


def remeasured_cpu_peak(precision: str) -> float:
    """A fresh probe of the CPU's matmul peak (the first may have run while other work held the cores)."""
    measured_matmul_flops.cache_clear()
    return peak_flops(torch.device("cpu"), precision)
