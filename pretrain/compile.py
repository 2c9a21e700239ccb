"""`train.compile: true`: every transformer block (the MTP modules' too) compiled in place with torch.compile
(`nn.Module.compile`: parameter names and checkpoints unchanged). Blocks rather than the whole model: one graph
per distinct block compiles once and serves all layers, and the pipeline stages, activation checkpointing and the
tensor-parallel layers around and inside them keep working (a collective inside a block is a graph break, not an
error). A dense block and the dropless MoE block (with bf16 autocast, where torch's grouped GEMM traces) are one
graph each (tests/model/test_compile.py). Compilation happens in the first step; its time is logged."""

from __future__ import annotations

import shutil

from torch import nn

from pretrain.model.transformer import Block


def compiler_problem(device_type: str) -> str | None:
    """Why torch.compile cannot generate code for this device here, or None. A CPU's code is C++ (a GPU's is
    Triton, which the CUDA wheels bring). Config validation calls it, so a run fails before any process starts."""
    if device_type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return ("on a CPU, torch.compile's generated code needs a C++ compiler (e.g. `apt install g++`); "
                "or set train.compile=false")
    return None


def compile_blocks(model: nn.Module) -> int:
    """Compile every Block of `model` in place; returns how many."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)
