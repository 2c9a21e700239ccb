"""Which precision a run computes in: `train.precision=auto` picks bf16 where the hardware runs it natively
(CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16) and fp32 elsewhere.

On CPUs with neither (most cloud CPUs: AVX2 only) torch's bf16 matmul is emulated and runs tens of times slower
than fp32, so asking for bf16 there is almost always a mistake: it still works, with a warning that gives the
slowdown measured on this machine. oneDNN's `ONEDNN_MAX_CPU_ISA` (e.g. `AVX2`, to imitate an older CPU on a newer
one) caps what counts as native.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from pretrain.config import PRECISIONS
from pretrain.hardware import measured_matmul_flops

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products (AVX512-BF16 or AMX).
_ONEDNN_BF16_ISAS = {
    "ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
}


class SlowPrecisionWarning(UserWarning):
    """bf16 asked for on a CPU that emulates it (tens of times slower than fp32)."""


@dataclass(frozen=True)
class CpuFeatures:
    """What the capability probe reads: the CPU's bf16 instructions and oneDNN's ISA cap, if any."""

    amx: bool
    avx512_bf16: bool
    onednn_max_isa: str = ""

    @classmethod
    def probe(cls) -> CpuFeatures:
        return cls(
            amx=torch.cpu._is_amx_tile_supported(),
            avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
            onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper(),
        )

    def kind(self) -> str:
        """A short name for the benchmark tables: 'AMX', 'AVX512-BF16', 'no native bf16', or an imitation."""
        native, _ = self.native_bf16()
        best = "AMX" if self.amx else "AVX512-BF16" if self.avx512_bf16 else ""
        if native:
            return best
        if best:
            return f"{best} CPU capped at {self.onednn_max_isa} (no native bf16)"
        return "no native bf16 (AVX2 class)"

    def native_bf16(self) -> tuple[bool, str]:
        units = [name for name, present in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if present]
        if not units:
            return False, "this CPU has neither AMX nor AVX512-BF16"
        if self.onednn_max_isa and self.onednn_max_isa not in _ONEDNN_BF16_ISAS:
            return False, f"ONEDNN_MAX_CPU_ISA={self.onednn_max_isa} turns off this CPU's {'/'.join(units)}"
        return True, f"this CPU has {'/'.join(units)}"


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str  # what the config says: auto | fp32 | bf16
    precision: str  # what the run computes in: fp32 | bf16
    reason: str

    def describe(self) -> str:
        how = "chosen by train.precision=auto" if self.requested == "auto" else "as configured"
        return f"precision {self.precision} ({how}: {self.reason})"


def native_bf16(device: torch.device, cpu: CpuFeatures | None = None) -> tuple[bool, str]:
    """Whether `device` computes bf16 matmuls natively, and why (or why not)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return False, f"{name} has no native bf16"
    if device.type != "cpu":
        return False, f"bf16 support of device '{device.type}' is not known"
    return (cpu or CpuFeatures.probe()).native_bf16()


def bf16_slowdown() -> float:
    """How many times slower a bf16 matmul runs than an fp32 one on this CPU (small sizes: a quick probe)."""
    return measured_matmul_flops(torch.float32, 256) / measured_matmul_flops(torch.bfloat16, 256)


def choose_precision(requested: str, device: torch.device, cpu: CpuFeatures | None = None) -> PrecisionChoice:
    """The precision a run uses on `device`; warns (SlowPrecisionWarning) when bf16 is asked for where it is slow."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got '{requested}'")
    native, why = native_bf16(device, cpu)
    if requested == "auto":
        if native:
            return PrecisionChoice(requested, "bf16", f"{why}: bf16 autocast")
        return PrecisionChoice(requested, "fp32", f"{why}, where bf16 matmul is emulated and slow: fp32")
    if requested == "bf16" and not native and device.type == "cpu":
        slowdown = bf16_slowdown()
        warnings.warn(
            f"train.precision=bf16 on a CPU without native bf16 ({why}): a bf16 matmul runs {slowdown:.0f}x slower "
            f"than fp32 here (measured), so training will be much slower; use train.precision=auto or fp32",
            SlowPrecisionWarning, stacklevel=2,
        )
        return PrecisionChoice(requested, "bf16", f"{why}; bf16 matmul measured {slowdown:.0f}x slower than fp32")
    return PrecisionChoice(requested, requested, why)
