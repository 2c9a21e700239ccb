"""Measure what torch.distributed moves: every c10d collective run inside `CommVolume()` is recorded with its
payload and group size, whoever called it (our TP autograd functions, DP bucketing, DeepSpeed, pipelining).

Payload is the size of the logical tensor the collective is about: the reduced tensor for all-reduce, the
gathered (full) output for all-gather, the full input for reduce-scatter, the tensor for broadcast and
point-to-point, the input for all-to-all. `bytes_sent` converts it to what one rank sends with the usual ring /
pairwise algorithms (all-reduce 2(n-1)/n, all-gather, reduce-scatter and all-to-all (n-1)/n), which is the
quantity Megatron's and ZeRO's communication formulas count.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.distributed.distributed_c10d import ProcessGroup
from torch.utils._python_dispatch import TorchDispatchMode

# c10d op name -> (our name, index of the payload argument)
_OPS = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0),
    "allgather_": ("all_gather", 1),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0),
    "alltoall_base_": ("all_to_all", 1),
    "alltoall_": ("all_to_all", 1),
    "send": ("send", 0),
    "recv_": ("recv", 0),
}
_RING_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
}


@dataclass
class Traffic:
    calls: int = 0
    elements: int = 0
    payload_bytes: int = 0
    bytes_sent: float = 0.0


def _tensors(arg) -> list[torch.Tensor]:
    if isinstance(arg, torch.Tensor):
        return [arg]
    if isinstance(arg, (list, tuple)):
        return [t for a in arg for t in _tensors(a)]
    return []


def _process_group(args) -> ProcessGroup | None:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):
                continue
    return None


class CommVolume(TorchDispatchMode):
    """`with CommVolume({"tp": tp_group, ...}) as vol: ...` then `vol.traffic`: {(op, group label): Traffic} for
    this rank. Groups not named are labelled by their size ("n=4"); a group given under several names (the grid's
    kinds with the same members share one) by the first."""

    def __init__(self, groups: dict[str, object] | None = None):
        super().__init__()
        self.labels: dict[str, str] = {}  # a group named twice (kinds with the same members): its first name
        for label, group in (groups or {}).items():
            if group is not None:
                self.labels.setdefault(group.group_name, label)
        self.traffic: dict[tuple[str, str], Traffic] = defaultdict(Traffic)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, rest = func.name().partition("::")
        if namespace == "c10d":
            op_name = rest.split(".")[0]
            if op_name in _OPS:
                op, index = _OPS[op_name]
                group = _process_group(args)
                n = group.size() if group is not None else 1
                label = self.labels.get(group.group_name, f"n={n}") if group is not None else "n=1"
                payload = _tensors(args[index])
                if op_name == "allgather_":
                    payload = _tensors(args[0])  # list of per-rank outputs: the full result
                elements = sum(t.numel() for t in payload)
                nbytes = sum(t.numel() * t.element_size() for t in payload)
                record = self.traffic[(op, label)]
                record.calls += 1
                record.elements += elements
                record.payload_bytes += nbytes
                record.bytes_sent += nbytes * _RING_FACTOR[op](n)
        return func(*args, **(kwargs or {}))

    def total_bytes_sent(self) -> float:
        return sum(t.bytes_sent for t in self.traffic.values())
