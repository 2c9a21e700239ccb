"""Sharded initialization: a model built on the `meta` device (no memory) and parallelized there gets real
storage for this rank's shards only, filled with the values the one-process model would have.

Each parameter's whole initial tensor is computed alone (its values depend only on the seed and its name, see
`pretrain/model/init.py`) and cut to this rank's shard with the plan's own shard mapping; the shard becomes the
parameter (copied out of the whole tensor where it is a part of it) and the rest is dropped: a rank never holds
more than its shards plus one whole tensor at a time.

The model is materialized one unit at a time (a block, the embedding, ...). With `partition` (ZeRO-3: DeepSpeed's
`zero.Init` conversion) each unit's parameters are handed over as soon as they are filled, so a rank holds its
ZeRO partitions of the units done, plus the one unit being filled.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator

import torch
from torch import nn

from parallel.plan import ParallelPlan
from pretrain.model.init import InitRule, initial_value


def _units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, bool]]:
    """(name prefix, module, whether its children belong to it): the module's own tensors, then each child; module
    lists and dicts are opened so that every block is a unit of its own."""
    yield prefix, module, False
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _units(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child, True


def materialize(model: nn.Module, plan: ParallelPlan, rules: dict[str, InitRule], seed: int,
                device: torch.device,
                partition: Callable[[list[nn.Parameter]], None] | None = None) -> nn.Module:
    """`rules`: the plain model's init rules by name (taken before parallelizing, `Transformer.init_rules`).
    `partition(params)`: takes over a unit's filled parameters (in place) before the next unit gets storage."""
    holders: dict[int, int] = {}  # tied parameters: how many places hold each
    for module in model.modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    materialized: dict[int, nn.Parameter] = {}  # a tied parameter's storage, given by the first place holding it
    with torch.no_grad():
        for prefix, unit, recurse in _units(model):
            modules = list(unit.named_modules(prefix=prefix)) if recurse else [(prefix, unit)]
            new = []
            for module_name, module in modules:
                for attr, buffer in module._buffers.items():
                    if buffer is not None and buffer.is_meta:  # filled by reset_buffers below
                        module._buffers[attr] = torch.empty_like(buffer, device=device)
                for attr, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    if id(param) in materialized:
                        setattr(module, attr, materialized[id(param)])
                        continue
                    name = f"{module_name}.{attr}" if module_name else attr
                    filled = nn.Parameter(_shard(param, name, plan, rules, seed, device),
                                          requires_grad=param.requires_grad)
                    if holders[id(param)] > 1:
                        materialized[id(param)] = filled
                    setattr(module, attr, filled)
                    new.append(filled)
            if partition is not None and new:
                partition(new)
        model.reset_buffers()
    return model


def _shard(param: nn.Parameter, name: str, plan: ParallelPlan, rules: dict[str, InitRule], seed: int,
           device: torch.device) -> torch.Tensor:
    """This rank's shard of `name`'s initial value, in storage of its own: the whole value is computed, cut and
    dropped (kept as is where the shard is all of it)."""
    if name not in rules:
        raise ValueError(f"parameter {name} of the parallelized model has no initialization rule")
    whole = initial_value(name, rules[name], seed, param.dtype)
    shard = plan.local_tensors({name: whole}, copy=False)[name]
    if shard.shape != param.shape:
        raise ValueError(f"parameter {name}: shard {tuple(shard.shape)} does not fit {tuple(param.shape)}")
    if shard.untyped_storage().nbytes() > shard.nbytes or not shard.is_contiguous():
        shard = shard.clone(memory_format=torch.contiguous_format)  # a view into the whole: copied out of it
    shard = shard.to(device)
    del whole
    _give_back_freed_memory()
    return shard


def _give_back_freed_memory() -> None:
    """glibc keeps freed blocks below its (adaptive) mmap threshold in the heap: the whole values dropped here
    would stay resident as holes between the shards (+9% of peak at TP=2 on a 346M model, tools/bench_init.py).
    malloc_trim returns them to the system; elsewhere (another libc) nothing is done."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
