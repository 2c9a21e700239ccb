"""Peak dense FLOP/s and board power of the accelerators we plan for: the one table behind MFU (the trainer, via
`pretrain.hardware`) and cost estimates (`pretrain cost estimate`, `pretrain cost report`).

Every figure is the vendor's datasheet value per GPU **without** 2:4 structured sparsity (NVIDIA's datasheets print
the sparse figure with an asterisk: the dense one is half of it). `fp32` is plain FP32 (not TF32 tensor cores):
what an fp32 run's MFU is measured against. `tdp_watts` is the board's maximum power (TDP/TBP), the energy
estimate's per-GPU draw: an upper bound on what the GPU itself uses, nothing for CPUs, network or cooling (PUE).
"""

from __future__ import annotations

from dataclasses import dataclass

T = 1e12


@dataclass(frozen=True)
class GPU:
    name: str  # what --gpu takes, and the substring of the CUDA/ROCm device name that identifies it
    description: str
    bf16: float  # dense peak FLOP/s
    fp8: float | None  # None: no FP8 tensor cores
    fp32: float
    tdp_watts: float
    source: str

    def peak(self, precision: str) -> float:
        value = {"bf16": self.bf16, "fp8": self.fp8, "fp32": self.fp32}.get(precision)
        if value is None:
            raise UnknownGPUError(
                f"{self.name} has no {precision} peak in the table" + (" (no FP8 tensor cores)" if precision == "fp8"
                                                                         else "; use bf16, fp8 or fp32"))
        return value


class UnknownGPUError(ValueError):
    pass


# In device-name matching order: a name that contains another comes first (GB200 before B200, A100 before A10).
GPUS: dict[str, GPU] = {g.name: g for g in (
    # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), SXM5 column: BF16 1,979 and FP8
    # 3,958 TFLOPS with sparsity, FP32 67 TFLOPS, max TDP up to 700 W. (PCIe/NVL cards are slower; a device name
    # "H100 ... PCIe" still reads this row.)
    GPU("H100", "NVIDIA H100 SXM5 80GB", 989 * T, 1979 * T, 67 * T, 700, "NVIDIA H100 datasheet (SXM5)"),
    # NVIDIA H800 SXM5: the export variant of H100 SXM with NVLink cut to 400 GB/s and little FP64; the same tensor
    # cores and clocks, so H100 SXM5's BF16/FP8/FP32 figures and 700 W (NVIDIA H800 datasheet). DeepSeek-V3's GPU.
    GPU("H800", "NVIDIA H800 SXM5 80GB", 989 * T, 1979 * T, 67 * T, 700, "NVIDIA H800 datasheet (= H100 SXM5)"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 1,979 and FP8 3,958 TFLOPS with sparsity, FP32 67,
    # max TDP up to 700 W (H100's GH100 die with 141 GB HBM3e).
    GPU("H200", "NVIDIA H200 SXM 141GB", 989 * T, 1979 * T, 67 * T, 700, "NVIDIA H200 datasheet (SXM)"),
    # NVIDIA GB200 NVL72 datasheet, "individual Blackwell GPU" column: FP8 10 and FP16/BF16 5 PFLOPS with sparsity,
    # FP32 80 TFLOPS, TDP configurable up to 1,200 W per GPU.
    GPU("GB200", "NVIDIA B200 in a GB200 superchip (NVL72)", 2500 * T, 5000 * T, 80 * T, 1200,
        "NVIDIA GB200 NVL72 datasheet (per GPU)"),
    # NVIDIA HGX B200 (Blackwell) datasheet, per GPU: FP8 9 and FP16/BF16 4.5 PFLOPS with sparsity, FP32 75 TFLOPS,
    # TDP configurable up to 1,000 W.
    GPU("B200", "NVIDIA B200 SXM (HGX B200)", 2250 * T, 4500 * T, 75 * T, 1000, "NVIDIA HGX B200 datasheet (per GPU)"),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: BF16 312 TFLOPS (624 with sparsity), FP32 19.5 TFLOPS,
    # max TDP 400 W; Ampere has no FP8.
    GPU("A100", "NVIDIA A100 SXM4 80GB", 312 * T, None, 19.5 * T, 400, "NVIDIA A100 datasheet (SXM 80GB)"),
    # AMD Instinct MI300X data sheet: peak BF16 1,307.4 and FP8 2,614.9 TFLOPS (dense; twice that with sparsity),
    # FP32 163.4 TFLOPS, 750 W peak board power.
    GPU("MI300X", "AMD Instinct MI300X OAM 192GB", 1307.4 * T, 2614.9 * T, 163.4 * T, 750, "AMD MI300X data sheet"),
    # NVIDIA L40S datasheet: BF16 362.05 (733 with sparsity), FP8 733 (1,466 with sparsity), FP32 91.6 TFLOPS, max
    # power 350 W.
    GPU("L40S", "NVIDIA L40S 48GB", 362 * T, 733 * T, 91.6 * T, 350, "NVIDIA L40S datasheet"),
    # NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity), FP32 31.2 TFLOPS, max power 150 W; no FP8.
    GPU("A10", "NVIDIA A10 24GB", 125 * T, None, 31.2 * T, 150, "NVIDIA A10 datasheet"),
)}


def known() -> str:
    return ", ".join(GPUS)


def lookup(name: str) -> GPU:
    """The table's row for a --gpu name (case and a trailing form factor such as "-SXM" or " SXM5" aside)."""
    key = name.strip().upper()
    for suffix in ("-SXM5", "-SXM", " SXM5", " SXM"):
        key = key.removesuffix(suffix)
    if key in GPUS:
        return GPUS[key]
    raise UnknownGPUError(f"unknown GPU '{name}'; known: {known()}")


def match_device(device_name: str) -> GPU | None:
    """The row whose name the CUDA/ROCm device name contains (e.g. "NVIDIA H100 80GB HBM3" -> H100), if any."""
    for gpu in GPUS.values():
        if gpu.name in device_name:
            return gpu
    return None
