"""The optimizer engine: what turns a step's backward passes into an optimizer step, and what the checkpoint
reads and restores. `PlainEngine` is our own (gradient sync from the plan, global-norm clipping, torch AdamW);
`parallel.deepspeed_engine.DeepSpeedEngine` hands the same work to DeepSpeed ZeRO. The trainer only talks to
this interface, so the engine is chosen by config (`deepspeed.enabled`).

Checkpoint tensors are this rank's (tensor/pipeline-parallel) pieces: parameters by name, optimizer states as
'<parameter>/<key>' (AdamW: step, exp_avg, exp_avg_sq); whole here, or a ZeRO partition's range of the piece where
`fragments()` names one (DeepSpeed).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from parallel.master_weights import MasterWeights
from parallel.plan import ParallelPlan
from pretrain.checkpoint import load_model_tensors, load_optimizer_tensors, model_tensors, optimizer_tensors


class PlainEngine:
    name = "plain"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan, grad_clip: float,
                 master_weights: MasterWeights | None = None):
        """`master_weights`: the model computes with bf16 copies of the parameters `optimizer` steps
        (train.param_dtype=bf16)."""
        self.model, self.optimizer, self.plan, self.grad_clip = model, optimizer, plan, grad_clip
        self.master_weights = master_weights

    def masters_in_model(self) -> AbstractContextManager:
        """The parameters the optimizer steps and checkpoints hold, in the model (bf16 weights: the fp32 masters)."""
        return self.master_weights.masters() if self.master_weights is not None else nullcontext()

    def _refresh(self) -> None:
        if self.master_weights is not None:
            self.master_weights.refresh()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def initialize(self) -> None:
        """Nothing to set up (DeepSpeed's engine wraps the model here)."""

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    last_step_applied = True  # a step whose gradient norm is not finite is not applied (the weights stay finite)

    def step(self, on_phase=lambda phase: None) -> float:
        """After the step's backward passes: sync, clip, step (unless the norm is not finite), zero. Returns the
        global grad norm."""
        with self.masters_in_model():
            on_phase("gradient sync")
            self.plan.sync_grads(self.model)
            on_phase("gradient clipping")
            grad_norm = self.plan.clip(self.model, self.grad_clip)
            self.last_step_applied = math.isfinite(grad_norm)
            if self.last_step_applied:  # the norm is global: every rank takes the same branch
                on_phase("optimizer step")
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.last_step_applied:
            self._refresh()
        return grad_norm

    def model_tensors(self) -> dict[str, torch.Tensor]:
        with self.masters_in_model():
            return model_tensors(self.model)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        with self.masters_in_model():
            return optimizer_tensors(self.model, self.optimizer)

    def fragments(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """Every checkpoint tensor is a whole piece: none is a range of one."""
        return {}

    def weight_fragments(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """The model holds every weight whole: a load reads whole pieces."""
        return {}

    def load(self, model: dict[str, torch.Tensor], read_optimizer, source,
             missing_ok: frozenset[str] = frozenset()) -> None:
        """`read_optimizer(fragments)` reads the optimizer tensors (collective; `fragments()`: none here, whole
        pieces). `missing_ok`: names that `model` need not hold (frozen LoRA base weights, or the adapters)."""
        with self.masters_in_model():
            load_model_tensors(self.model, model, source, missing_ok)
            load_optimizer_tensors(self.model, self.optimizer, read_optimizer(self.fragments()))
        self._refresh()
