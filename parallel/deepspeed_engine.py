"""DeepSpeed ZeRO (stages 0-3) over the data-parallel group only, on our tensor-parallel model.

- DeepSpeed gets our process grid as its `mpu`: it shards and reduces over `dp` (times `cp`: `dp_cp`), all-reduces
  the grad norm over the model-parallel group, and counts a parameter once per tensor-parallel group unless it is marked
  `tensor_model_parallel` (ours: every sharded weight, and replicated KV heads on the first rank holding them).
- Gradients that TP ranks only hold part of (sequence-parallel norms, replicated KV heads) are completed by
  tensor hooks during backward, before ZeRO reduces or partitions them.
- The optimizer is our torch AdamW (with our weight-decay groups); the trainer sets its learning rate every
  step as in the plain engine. Precision: fp32, or bf16 with DeepSpeed's fp32 master weights.
- Checkpoints stay layout-free without assembling anything: each rank writes the range of each fp32 parameter and
  AdamW state that its ZeRO partition holds (`fragments()`: ZeRO-1/2's `_hp_mapping`, ZeRO-3's local partition),
  placed in the full tensor by the sharded checkpoint format. A load reads only this rank's ranges of the AdamW
  states, and of the weights under ZeRO-3 (ZeRO-0/1/2 read the weights' whole pieces: the model holds them whole);
  so a ZeRO-3 DP=2 checkpoint resumes as ZeRO-1, with the plain engine, or on one process.
- ZeRO-3 initializes sharded: `ZeroInitPartitioner` hands each unit of the model to DeepSpeed's `zero.Init` as
  `parallel.materialize` fills it, so no rank holds its whole share of the model at any time.
- `deepspeed.initialize` runs lazily (first step, save or load), after a resume has put the checkpoint's
  weights into the plain model (ZeRO-0/1/2).
- With pipeline parallelism (ZeRO-0/1) the schedule runs the backward; DeepSpeed then reduces the accumulated
  gradients over `dp` and steps once (`managed_gradient_accumulation: false`). With tied embeddings, the last
  stage's copy of the embedding is left out of DeepSpeed's optimizer: its gradient is summed into the first
  stage's, which DeepSpeed updates (and counts once in the grad norm), and the updated weight is broadcast back.
- With expert parallelism (ZeRO-1/2), DeepSpeed's MoE support reduces and partitions the expert weights over our
  `expert_dp` group and the rest over `dp` (parallel/deepspeed_moe.py); each rank writes its partition's range of
  its experts, placed in the `ep`-split tensor.
"""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import AbstractContextManager, nullcontext

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
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher set it
    if dist.is_initialized():
        return
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


class ZeroInitPartitioner:
    """ZeRO-3's sharded initialization: DeepSpeed's own `zero.Init` conversion partitions each unit's parameters
    over the data-parallel group as `parallel.materialize` fills them, so no rank ever holds its whole (tensor-
    and pipeline-parallel) shard of the model. `deepspeed.initialize` later finds them partitioned and keeps them."""

    def __init__(self, plan: ParallelPlan, cfg):
        self.mpu, self.ds_config = GridMPU(plan), generate(cfg)
        self.first: nn.Parameter | None = None  # a converted parameter: it converts the next ones the same way

    def __call__(self, params: list[nn.Parameter]) -> None:
        if self.first is not None:
            self.first.convert_to_zero_parameters(param_list=params)
            return
        deepspeed = import_deepspeed()
        ensure_process_group()
        from deepspeed.accelerator import get_accelerator

        # as deepspeed.initialize does: its communication layer over our process group (its config reads the
        # data-parallel size through it)
        deepspeed.comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                        dist_init_required=False)
        holder = nn.Module()  # zero.Init converts a module's parameters in place
        for i, param in enumerate(params):
            holder.register_parameter(f"p{i}", param)
        deepspeed.zero.Init(module=holder, data_parallel_group=self.mpu.get_data_parallel_group(),
                            config_dict_or_path=self.ds_config, mpu=self.mpu)
        self.first = params[0]


class DeepSpeedEngine:
    name = "deepspeed"
    last_step_applied = True  # whether DeepSpeed applied the last step (it may whatever its gradient norm)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: ParallelPlan, cfg):
        self.model, self.plan, self.cfg = model, plan, cfg
        self.master_weights = None  # DeepSpeed's bf16 mode keeps its own fp32 masters
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
        # built under ZeRO-3's zero.Init (`ZeroInitPartitioner`): no rank holds a whole weight before a load
        self.weights_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
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
    def masters_in_model(self) -> AbstractContextManager:
        """The model's parameters are the ones checkpoints hold (DeepSpeed keeps its masters in its optimizer)."""
        return nullcontext()

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
        # ZeRO-3 hands its flat fp32 partitions to the optimizer's groups only for the length of a step
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        if flats is None:
            flats = [flat for group in base.param_groups for flat in group["params"]]
        for flat in flats:
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
    @staticmethod
    def _partition(p: nn.Parameter) -> tuple[tuple[int, ...], int, int] | None:
        """(p's shape, first element, element count) of this rank's part of p's fp32 master weight and AdamW
        states, in p's row-major order (count 0: it holds none); None where DeepSpeed keeps no partition of p."""
        if hasattr(p, "ds_id"):  # ZeRO-3: partition rank r holds elements [r * size, (r + 1) * size), the last padded
            size = p.ds_tensor.ds_numel
            start = dist.get_rank(group=p.ds_process_group) * size  # DeepSpeed's own partition rank
            return tuple(p.ds_shape), start, max(0, min(size, p.ds_numel - start))
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer: a range of p, or None
            address = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
            return tuple(p.shape), address.start if address else 0, address.numel if address else 0
        return None

    @staticmethod
    def _local_values(p: nn.Parameter, key: str | None, count: int) -> torch.Tensor:
        """This rank's part of p's fp32 master weight (key None) or AdamW state `key`: `count` elements, 1-D."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        if hasattr(p, "ds_id"):
            local = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        else:
            local = p._hp_mapping.get_hp_fragment(key)
        return local[:count].detach().float().cpu().clone()

    def _held(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters this rank writes: all but the last stage's copy of a tied embedding (the first stage's
        ranks write it)."""
        return [(name, p) for name, p in self._params() if p is not self.tied_copy]

    def fragments(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """For each parameter whose checkpoint tensors on this rank are a ZeRO partition's range rather than the
        whole (tensor-parallel) piece: (the piece's shape, the range's first element, its element count; 0 where
        this rank holds none of it). No communication."""
        self.initialize()
        out = {}
        for name, p in self._held():
            partition = self._partition(p)
            if partition is not None:
                out[name] = partition
        return out

    def weight_fragments(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """ZeRO-3 partitioned the weights as they were initialized: a load reads only this rank's ranges of them (as
        `fragments()`). Other stages hold the weights whole (as the plain model): {}."""
        if not self.weights_partitioned:
            return {}
        return self.fragments()

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's part of every fp32 parameter, without any collective: its ZeRO partition's range (1-D, placed
        by `fragments()`) or nothing where it holds none, the whole piece where DeepSpeed keeps no partition; and
        the persistent buffers."""
        self.initialize()
        out = {}
        for name, p in self._held():
            partition = self._partition(p)
            if partition is None:
                out[name] = p.detach().float().cpu().clone()
            elif partition[2] > 0:
                out[name] = self._local_values(p, None, partition[2])
        buffers = self._buffers_among(model_tensors(self.model))
        return out | buffers

    def _buffers_among(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries of `tensors` that are not parameters of the model (its persistent buffers)."""
        parameters = {name for name, _ in self.model.named_parameters()}
        return {k: v for k, v in tensors.items() if k not in parameters}

    def _base_step(self) -> torch.Tensor:
        for state in self.optimizer.optimizer.state.values():
            if "step" in state:
                return torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().clone()
        return torch.zeros((), dtype=torch.float32)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW's moments as this rank's ranges (as `model_tensors`), and the step count."""
        self.initialize()
        step = self._base_step()
        out = {}
        for name, p in self._held():
            partition = self._partition(p)
            if partition is not None and partition[2] > 0:
                for key in ADAM_STATES:
                    out[f"{name}/{key}"] = self._local_values(p, key, partition[2])
            out[f"{name}/step"] = step.clone()
        return out

    def load(self, model: dict[str, torch.Tensor], read_optimizer, source,
             missing_ok: frozenset[str] = frozenset()) -> None:
        """Weights go into the plain model before DeepSpeed partitions it and set the fp32 master weights (each rank
        keeps its partition); under zero.Init (ZeRO-3) they are this rank's ranges (`weight_fragments()`), set in its
        partitions. Then `read_optimizer(self.fragments())` reads only this rank's ranges of the AdamW states
        (collective), which are set in place."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        started = self.engine is not None  # a rollback: DeepSpeed holds the weights already
        if self.weights_partitioned:  # the persistent buffers only: the weights are partitioned
            self.model.load_state_dict(self._buffers_among(model), strict=False)
        elif not started:
            load_model_tensors(self.model, model, source, missing_ok)
        self.initialize()
        fragments = self.fragments()
        optimizer = read_optimizer(fragments)
        steps = set()
        for name, p in self._held():
            if name in model and self.weights_partitioned:
                self._set_local_weight(p, model[name])
            elif name in model:
                safe_set_full_fp32_param(p, model[name].to(torch.float32))
                if started:  # the masters alone would reach the module's weights only after the next step
                    p.data.copy_(model[name].to(p.dtype))
            for key in ADAM_STATES:
                value = optimizer.get(f"{name}/{key}")
                if value is None:
                    continue
                if name in fragments:
                    self._set_local_values(p, key, value.to(torch.float32))
                else:
                    safe_set_full_optimizer_state(p, value.to(torch.float32), key)
            if f"{name}/step" in optimizer:
                steps.add(float(optimizer[f"{name}/step"]))
        if steps:
            step = max(steps)
            for state in self.optimizer.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.as_tensor(step, dtype=torch.float32) if torch.is_tensor(
                        state["step"]) else step

    @staticmethod
    def _set_local_weight(p: nn.Parameter, values: torch.Tensor) -> None:
        """ZeRO-3: this rank's range of p (1-D) into its fp32 master partition (trained parameters) and into the
        partition the module computes with."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32)
        local[:values.numel()] = values.to(torch.float32)
        if p.requires_grad:
            master = safe_get_local_fp32_param(p)
            safe_set_local_fp32_param(p, local.to(master.device))
        p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype))

    @staticmethod
    def _set_local_values(p: nn.Parameter, key: str, values: torch.Tensor) -> None:
        """The inverse of `_local_values` for an AdamW state: this rank's range of it, 1-D."""
        from deepspeed.utils import safe_get_local_optimizer_state, safe_set_local_optimizer_state

        if hasattr(p, "ds_id"):  # the setter takes the whole local partition, padding included
            local = safe_get_local_optimizer_state(p, key).clone()
            local[:values.numel()] = values.to(local.device)
            safe_set_local_optimizer_state(p, local, key)
        else:
            fragment = p._hp_mapping.get_hp_fragment(key)
            fragment.copy_(values.to(fragment.device))
