"""Sharded initialization: a model built on the `meta` device (no memory) and parallelized there gets real
storage for this rank's shards only, filled with the values the one-process model would have.

Each parameter's whole initial tensor is computed alone (its values depend only on the seed and its name, see
`pretrain/model/init.py`), cut to this rank's shard with the plan's own shard mapping, copied in and dropped: a
rank never holds more than its shards plus one whole tensor at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.plan import ParallelPlan
from pretrain.model.init import InitRule, initial_value


def materialize(model: nn.Module, plan: ParallelPlan, rules: dict[str, InitRule], seed: int,
                device: torch.device) -> nn.Module:
    """`rules`: the plain model's init rules by name (taken before parallelizing, `Transformer.init_rules`)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # tied parameters: to_empty gives each holder its own
    for module in model.modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, attr))
    model.to_empty(device=device)
    for (first, first_attr), *others in (group for group in holders.values() if len(group) > 1):
        for module, attr in others:
            setattr(module, attr, getattr(first, first_attr))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in rules:
                raise ValueError(f"parameter {name} of the parallelized model has no initialization rule")
            whole = initial_value(name, rules[name], seed, param.dtype)
            shard = plan.local_tensors({name: whole}, copy=False)[name]
            if shard.shape != param.shape:
                raise ValueError(f"parameter {name}: shard {tuple(shard.shape)} does not fit {tuple(param.shape)}")
            param.copy_(shard)
            del whole, shard
        model.reset_buffers()
    return model
