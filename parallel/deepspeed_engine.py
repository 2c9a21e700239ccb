"""DeepSpeed ZeRO (stages 0-3) over the data-parallel group only, on our tensor-parallel model.

- DeepSpeed gets our process grid as its `mpu`: it shards and reduces over `dp` (times `cp`: `dp_cp`), all-reduces
  the grad norm over the model-parallel group, and counts a parameter once per tensor-parallel group unless it is marked
  `tensor_model_parallel` (ours: every sharded weight, and replicated KV heads on the first rank holding them).
- Gradients that TP ranks only hold part of (sequence-parallel norms, replicated KV heads) are completed by
  tensor hooks during backward, before ZeRO reduces or partitions them.
- The optimizer is our torch AdamW (with our weight-decay groups); the trainer sets its learning rate every
  step as in the plain engine. Precision: fp32, or bf16 with DeepSpeed's fp32 master weights.
- Checkpoints stay layout-free: parameters and AdamW states are assembled whole over the data-parallel group
  with DeepSpeed's `safe_get_full_*` and restored with `safe_set_full_*`, so a ZeRO-3 DP=2 checkpoint resumes
  as ZeRO-1, with the plain engine, or on one process.
- `deepspeed.initialize` runs lazily (first step, save or load), after a resume has put the checkpoint's
  weights into the plain model.
- With pipeline parallelism (ZeRO-0/1) the schedule runs the backward; DeepSpeed then reduces the accumulated
  gradients over `dp` and steps once (`managed_gradient_accumulation: false`). With tied embeddings, the last
  stage's copy of the embedding is left out of DeepSpeed's optimizer: its gradient is summed into the first
  stage's, which DeepSpeed updates (and counts once in the grad norm), and the updated weight is broadcast back.
- With expert parallelism (ZeRO-1/2), DeepSpeed's MoE support reduces and partitions the expert weights over our
  `expert_dp` group and the rest over `dp` (parallel/deepspeed_moe.py); the checkpoint gathers each rank's experts
  whole over `expert_dp` here; the sharded checkpoint stores them as this rank's piece of the `ep`-split tensor.
"""

from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as dist
from torch import nn

from parallel import deepspeed_moe
from parallel.deepspeed_config import generate
from parallel.plan import ParallelPlan
from parallel.tensor.apply import register_tensor_parallel_grad_hooks
from pretrain.checkpoint import load_model_tensors, model_tensors

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import deepspeed
        import deepspeed.ops
    # its shared-memory CPU collective would be JIT-compiled with c++ (minutes); gloo does the work here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def ensure_process_group() -> None:
    """DeepSpeed needs torch.distributed even on one process: a one-rank gloo group on a free port."""
    if dist.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher set it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class GridMPU:
    """Our process grid in the `mpu` shape DeepSpeed (and Megatron) expect."""

    def __init__(self, plan: ParallelPlan):
        self.grid = plan.grid

    def _rank(self, kind):
        return self.grid.coords[kind]

    def _group(self, kind):
        group = self.grid.group(kind)
        # one process (no grid groups): its one-rank world stands for every group
        return dist.group.WORLD if group is None and self.grid.shape.world_size == 1 else group

    # DeepSpeed's data-parallel group is our data x context group: both see other tokens, so ZeRO reduces (and
    # partitions) over all of them, as Megatron passes its data-parallel group "with context parallel"
    def get_data_parallel_group(self):
        return self._group("dp_cp")

    def get_data_parallel_rank(self):
        return self.grid.group_ranks["dp_cp"].index(self.grid.rank)

    def get_data_parallel_world_size(self):
        return self.grid.size("dp_cp")

    def get_tensor_model_parallel_group(self):
        return self._group("tp")

    def get_tensor_model_parallel_rank(self):
        return self._rank("tp")

    def get_tensor_model_parallel_world_size(self):
        return self.grid.size("tp")

    def get_tensor_model_parallel_src_rank(self):
        return self.grid.group_ranks["tp"][0]

    def get_pipeline_model_parallel_group(self):
        return self._group("pp")

    def get_pipeline_model_parallel_rank(self):
        return self._rank("pp")

    def get_pipeline_model_parallel_world_size(self):
        return self.grid.size("pp")

    def get_model_parallel_group(self):
        return self._group("model")

    def get_model_parallel_rank(self):
        return self.grid.group_ranks["model"].index(self.grid.rank)

    def get_model_parallel_world_size(self):
        return self.grid.size("model")


class DeepSpeedEngine:
    name = "deepspeed"
    last_step_applied = True  # whether DeepSpeed applied the last step (it may whatever its gradient norm)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan, cfg):
        self.model, self.plan, self.cfg = model, plan, cfg
        self.torch_optimizer = optimizer
        self.ds_config = generate(cfg)
        self.engine = None
        self.stage = cfg.deepspeed.zero_stage
        self.pipelined = plan.pipeline is not None
        self.tied_copy = None  # the last stage's copy of a tied embedding, when this rank has no first stage
        if self.pipelined and "embed.weight" in plan.not_counted:
            self.tied_copy = dict(model.named_parameters())["embed.weight"]
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not self.tied_copy]
        self.names = {id(p): n for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            spec = plan.specs[name]
            # DeepSpeed counts a parameter in the grad norm on every TP rank if marked, else on TP rank 0 only
            p.tensor_model_parallel = spec.kind != "replicated" and spec.counted_once
        if plan.tp > 1:
            register_tensor_parallel_grad_hooks(model, plan.specs, plan.grid.group("tp"))
        self.moe = deepspeed_moe.uses_deepspeed_moe(plan)
        if self.moe:
            deepspeed_moe.mark_expert_params(model, plan)

    # -- lifecycle --------------------------------------------------------------------------------
    def initialize(self) -> None:
        if self.engine is not None:
            return
        deepspeed = import_deepspeed()
        ensure_process_group()
        if self.moe:
            deepspeed_moe.register_groups(self.plan)
            deepspeed_moe.split_optimizer_groups(self.torch_optimizer, self.plan)
            deepspeed_moe.attach_marker(self.model, self.plan)
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, optimizer=self.torch_optimizer, config=self.ds_config, mpu=GridMPU(self.plan),
                dist_init_required=False,
            )
        finally:
            deepspeed_moe.detach_marker(self.model)
        if self.moe:
            deepspeed_moe.check_groups(self.engine, self.optimizer, self.plan)
        self._materialize_optimizer_state()

    def _materialize_optimizer_state(self) -> None:
        """Create AdamW's state now (zeros and step 0, exactly what its first step would create) and link it to
        every parameter. DeepSpeed links the states lazily after the first step of the first parameter group,
        before the other groups have any, which leaves their `safe_get_full_optimizer_state` empty; a resume
        also needs the states to exist before the first step."""
        base = self.optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                state = base.state[flat]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for key in ADAM_STATES:
                        state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):  # ZeRO-1/2 and bf16 (ZeRO-3 reads directly)
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    @property
    def param_groups(self) -> list[dict]:
        return (self.optimizer if self.engine is not None else self.torch_optimizer).param_groups

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        seen, out = set(), []
        for name, p in self.model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    # -- training ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, documents=None) -> torch.Tensor:
        self.initialize()
        return self.engine(input_ids, labels, documents)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps (= accum)
        self.engine.step()  # a no-op except at the accumulation boundary

    def step(self, on_phase=lambda phase: None) -> float | None:
        """Without a pipeline the optimizer step already happened in the last `backward` (DeepSpeed's boundary);
        with one, the schedule's gradients are reduced and applied here."""
        if self.pipelined:
            self._pipelined_step(on_phase)
        self.last_step_applied = bool(self.engine.was_step_applied())
        if not self.last_step_applied:  # it found non-finite gradients and skipped the step: the trainer's NaN policy
            return float("nan")
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None  # None: this DeepSpeed optimizer does not report it

    def _pipelined_step(self, on_phase) -> None:
        self.initialize()
        group = self.plan.tied_embedding_group
        on_phase("gradient sync")
        self.plan.sync_tied_embedding(self.model)
        if self.tied_copy is not None:
            self.tied_copy.grad = None  # its sum now lives on the first stage, which DeepSpeed steps
        on_phase("optimizer step")
        self.engine.step()
        on_phase("tied embedding broadcast")  # on every rank: ranks count the phases they enter
        if group is not None:
            dist.broadcast(self.model.embed.weight.data, src=self.plan.grid.group_ranks["embedding"][0], group=group)

    # -- checkpoints ------------------------------------------------------------------------------
    def model_tensors(self) -> dict[str, torch.Tensor]:
        """Whole fp32 parameters (collective over the data-parallel group) and persistent buffers."""
        from deepspeed.utils import safe_get_full_fp32_param

        self.initialize()
        out = {}
        for name, p in self._params():
            full = safe_get_full_fp32_param(p)  # None for a parameter DeepSpeed does not own (a tied copy)
            out[name] = (p if full is None else full).detach().float().cpu().clone()
        buffers = {k: v for k, v in model_tensors(self.model).items() if k not in dict(self.model.named_parameters())}
        return out | buffers

    def _base_step(self) -> torch.Tensor:
        for state in self.optimizer.optimizer.state.values():
            if "step" in state:
                return torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().clone()
        return torch.zeros((), dtype=torch.float32)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self.initialize()
        step = self._base_step()
        out = {}
        for name, p in self._params():
            if p is self.tied_copy:
                continue
            for key in ADAM_STATES:
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    out[f"{name}/{key}"] = value.detach().cpu().clone()
            out[f"{name}/step"] = step.clone()
        return out

    def load(self, model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], source,
             missing_ok: frozenset[str] = frozenset()) -> None:
        """Weights go into the plain model before DeepSpeed partitions it; then the fp32 master weights and
        the AdamW states are set whole (each rank keeps its partition)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        started = self.engine is not None  # a rollback: DeepSpeed holds the weights already
        if not started:
            load_model_tensors(self.model, model, source, missing_ok)
        self.initialize()
        steps = set()
        for name, p in self._params():
            if p is self.tied_copy:
                continue
            if name in model:
                safe_set_full_fp32_param(p, model[name].to(torch.float32))
                if started:  # the masters alone would reach the module's weights only after the next step
                    p.data.copy_(model[name].to(p.dtype))
            for key in ADAM_STATES:
                if f"{name}/{key}" in optimizer:
                    safe_set_full_optimizer_state(p, optimizer[f"{name}/{key}"].to(torch.float32), key)
            if f"{name}/step" in optimizer:
                steps.add(float(optimizer[f"{name}/step"]))
        if steps:
            step = max(steps)
            for state in self.optimizer.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.as_tensor(step, dtype=torch.float32) if torch.is_tensor(
                        state["step"]) else step
