"""Activation recomputation of the transformer blocks (`train.activation_checkpointing`).

- `full`: a block keeps only its input; its whole forward runs again in the backward (about 4/3 of the compute).
- `selective`: a block keeps the outputs of its matrix multiplications and fused attention kernels and recomputes
  everything between them in the backward (norms, RoPE, SiLU and products, softmaxes of the router, casts, a CPU
  math-kernel attention's score matrix): the tensors that are expensive to recompute stay, the cheap and often
  large ones go, as torchtitan's op-level selective checkpointing and Megatron's selective recomputation do. No
  matrix multiplication runs twice. Built on torch's selective checkpoint contexts.

In both, the recomputed forward counts nothing toward the MoE load statistics (it is the same tokens again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from pretrain.model.moe import moe_statistics_paused

_aten = torch.ops.aten
SAVED_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(_aten, name))


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of matrix multiplications and fused attention; recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def recompute_contexts(block: nn.Module, mode: str):
    """(context of the first forward, context of its recomputation in the backward) for `checkpoint`."""
    if mode == "selective":
        forward, recompute = create_selective_checkpoint_contexts(selective_policy)
        return forward, _both(recompute, moe_statistics_paused(block))
    return contextlib.nullcontext(), moe_statistics_paused(block)


@contextlib.contextmanager
def observing_selective_saves(on_saved: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Calls `on_saved` with each tensor selective recomputation keeps (first forwards, not recomputations) while
    inside: how the memory planner's count and the recomputation benchmark are checked against what is kept."""
    global selective_policy
    policy = selective_policy

    def observed(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        decision = policy(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            for out in tree_leaves(ctx.op_output):
                if isinstance(out, torch.Tensor):
                    on_saved(out)
        return decision

    selective_policy = observed
    try:
        yield
    finally:
        selective_policy = policy
