"""DeepSpeed ZeRO-1/2 with our expert parallelism, through DeepSpeed's own MoE support.

ZeRO-1/2 treat a parameter with `allreduce = False` and a `group_name` as an expert parameter and a param group
with `'moe': True` and that `name` as an expert group: its gradients are reduced (reduce-scatter) over the
expert-data-parallel group `expert_dp_process_group[name]` only, divided by the whole data-parallel size, as
`ParallelPlan.sync_grads` does (each expert's gradient already holds its expert-parallel group's tokens from the
all-to-all's backward; with context parallelism both groups also span the context-parallel ranks: `dp_cp` and
`expert_dp_cp`), its fp32 master weights and AdamW states are partitioned over that group, and DeepSpeed's
`safe_get_full_*`/`safe_set_full_*` gather and scatter them over it. Dense parameters stay on `dp`. The global
grad norm sums every rank's partition of every group over `dp` (each expert shard's partition once: `dp` is
`ep` x `expert_dp`) and over the model-parallel group, as `ParallelPlan.clip` counts it.

How DeepSpeed is told, and why it cannot pick the wrong groups:
- The groups are OUR grid's `ep` and `expert_dp` groups, registered under DeepSpeed's name for them
  (`ep_size_<ep>`) in `deepspeed.utils.groups` before `deepspeed.initialize`. DeepSpeed creates its own groups
  only for a name that is not registered yet (its `MoE` layer checks first); its own layout would be wrong for us
  under tensor parallelism (it groups the ranks of one expert-data-parallel group across TP ranks, while our
  experts are split over TP). A name already registered with other ranks is an error.
- DeepSpeed turns its MoE path on only when the model holds a `deepspeed.moe.layer.MoE` module: an empty
  `ExpertGroupsMarker` (an `MoE` with no parameters, never called) is attached to the model for the duration of
  `deepspeed.initialize` and removed after it, so the model's modules, parameters and state dict are unchanged.
- The AdamW's weight-decay groups are split into dense and expert groups with DeepSpeed's
  `split_params_into_different_moe_groups_for_optimizer` (same hyperparameters per group).
- After `deepspeed.initialize`, `check_groups` reads back the groups ZeRO reduces and partitions each param group
  over and compares their ranks with our grid's: a mismatch is an error, not a silent wrong reduction.

ZeRO-1/2 reduce expert gradients over `expert_dp` only with `contiguous_gradients` (the other path falls back to
`dp`): the generated config keeps it on with expert parallelism, also under pipeline parallelism, and
`check_groups` refuses an override. ZeRO-3 (DeepSpeed: "Native DeepSpeed MoE is not supported with ZeRO Stage 3")
and ZeRO-0 (its engine-side all-reduce and clipping paths are not the ones proven here) are config errors with
expert parallelism.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from parallel.plan import ParallelPlan

MARKER = "_deepspeed_expert_groups"


def group_name(plan: ParallelPlan) -> str:
    """DeepSpeed's name for the expert-parallel group of size ep (it parses the size back from it)."""
    return f"ep_size_{plan.grid.size('ep')}"


def uses_deepspeed_moe(plan: ParallelPlan) -> bool:
    return bool(plan.expert_names) and plan.grid.size("ep") > 1


def mark_expert_params(model: nn.Module, plan: ParallelPlan) -> None:
    """DeepSpeed's marks of an expert parameter: not all-reduced over `dp`, reduced over its group's `expert_dp`."""
    name = group_name(plan)
    for param_name, p in model.named_parameters():
        if param_name in plan.expert_names:
            p.allreduce = False
            p.group_name = name


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def register_groups(plan: ParallelPlan) -> None:
    """Our `ep` and `expert_dp` groups as DeepSpeed's expert-parallel and expert-data-parallel groups."""
    from deepspeed.utils import groups

    name = group_name(plan)
    for kind, table, rank_table in (
        ("ep", groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS),
        ("expert_dp_cp", groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS),
    ):
        group, ranks = plan.grid.group(kind), list(plan.grid.group_ranks[kind])
        if group is None or _ranks(group) != ranks:
            raise RuntimeError(f"DeepSpeed MoE: our '{kind}' group is missing or is not ranks {ranks}")
        if name in table and _ranks(table[name]) != ranks:
            raise RuntimeError(f"DeepSpeed already has an expert group '{name}' ({kind}) with ranks "
                               f"{_ranks(table[name])}; this rank's grid has {ranks}")
        table[name], rank_table[name] = group, ranks


def split_optimizer_groups(optimizer, plan: ParallelPlan) -> None:
    """Each param group of the torch optimizer split into its dense part and its expert part (`'moe': True`,
    `name` = the expert group's name), same hyperparameters; groups left empty are dropped by DeepSpeed."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    for i, group in enumerate(optimizer.param_groups):
        group.setdefault("name", f"group_{i}")
    optimizer.param_groups[:] = split_params_into_different_moe_groups_for_optimizer(list(optimizer.param_groups))
    expected = group_name(plan)
    for group in optimizer.param_groups:
        if group.get("moe") and group["name"] != expected:
            raise RuntimeError(f"optimizer group {group['name']!r} is not the expert group {expected!r}")


def expert_groups_marker(plan: ParallelPlan, num_experts: int) -> nn.Module:
    """A `deepspeed.moe.layer.MoE` with no parameters: its presence turns DeepSpeed's MoE path on."""
    from deepspeed.moe.layer import MoE

    class ExpertGroupsMarker(MoE):
        def __init__(self):
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no groups of DeepSpeed's making
            self.num_experts = num_experts
            self.ep_size = plan.grid.size("ep")
            self.expert_group_name = group_name(plan)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                raise RuntimeError(f"expert group {self.expert_group_name} is not registered")

        def forward(self, *args, **kwargs):
            raise RuntimeError("the DeepSpeed expert-groups marker is not a layer")

    return ExpertGroupsMarker()


def attach_marker(model: nn.Module, plan: ParallelPlan) -> None:
    model.add_module(MARKER, expert_groups_marker(plan, model.cfg.moe.num_experts))


def detach_marker(model: nn.Module) -> None:
    if MARKER in model._modules:
        del model._modules[MARKER]


def check_groups(ds_engine, zero_optimizer, plan: ParallelPlan) -> None:
    """The groups DeepSpeed reduces and partitions over are exactly our grid's: dense param groups over `dp`,
    expert param groups over `expert_dp`, and every expert parameter in an expert group."""
    if not ds_engine.has_moe_layers:
        raise RuntimeError("DeepSpeed did not enable its MoE path for the expert-parallel model")
    if not zero_optimizer.contiguous_gradients:  # the other path reduces expert gradients over `dp`
        raise RuntimeError("expert parallelism with ZeRO needs zero_optimization.contiguous_gradients=true")
    name = group_name(plan)
    want = {"dp": list(plan.grid.group_ranks["dp_cp"]), "expert_dp": list(plan.grid.group_ranks["expert_dp_cp"])}
    if _ranks(ds_engine.expert_data_parallel_group[name]) != want["expert_dp"]:
        raise RuntimeError("DeepSpeed's expert-data-parallel group is not our grid's expert_dp(_cp) group")
    if _ranks(ds_engine.expert_parallel_group[name]) != list(plan.grid.group_ranks["ep"]):
        raise RuntimeError("DeepSpeed's expert-parallel group is not our grid's ep group")
    groups = zero_optimizer.real_dp_process_group
    for i, group in enumerate(zero_optimizer.optimizer.param_groups):
        kind = "expert_dp" if group.get("moe") else "dp"
        got = _ranks(groups[i]) if groups[i] is not None else [dist.get_rank()]
        if got != want[kind] or zero_optimizer.partition_count[i] != len(want[kind]):
            raise RuntimeError(f"DeepSpeed partitions param group {i} ({group.get('name')}) over ranks {got} "
                               f"({zero_optimizer.partition_count[i]} partitions); expected {kind} {want[kind]}")
        for p in zero_optimizer.bit16_groups[i]:
            if getattr(p, "group_name", None) == name and getattr(p, "allreduce", True) is False:
                if kind != "expert_dp":
                    raise RuntimeError("an expert parameter is in a dense DeepSpeed param group")
            elif kind == "expert_dp":
                raise RuntimeError("a dense parameter is in DeepSpeed's expert param group")
