"""bf16 weights with fp32 master weights for the plain engine (`train.param_dtype=bf16`), as Megatron's
`--bf16` does: the model computes with bf16 copies of its matrices, so autocast casts no weight in a forward;
AdamW steps the fp32 masters; the bf16 copies are refreshed from them after each step.

The masters are the parameters the model was built with: the optimizer, the checkpoints (which store the
masters, so a bf16-weights run and an fp32 run resume from each other), the gradient sync and the clipping see
them, inside `masters()`, which puts them back in their modules. Outside it the modules hold the bf16 copies.
Each bf16 gradient is added to its master's fp32 gradient as soon as autograd has accumulated it (a
post-accumulate-grad hook), then dropped: micro-batches accumulate in fp32, and a bf16 gradient lives only
until its parameter's backward is done.

Kept in fp32 (not copied): vectors (norm gains, biases), embeddings (the residual stream starts from them in
fp32; a tied LM head shares the embedding), routers (scores in fp32, as the router computes them), frozen
parameters, and buffers (RoPE tables, expert biases, load counters).

Bytes per bf16-copied parameter: 2 (bf16 weight) + 4 (master) + 4 (fp32 gradient) + 8 (AdamW moments) = 18,
plus the bf16 gradient while its backward runs; the fp32 engine with autocast holds 16 and casts every weight
in every forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from parallel.tensor.layers import VocabParallelEmbedding
from pretrain.model.moe import Router

KEPT_IN_FP32 = (nn.Embedding, VocabParallelEmbedding, Router)  # every parameter of these modules


class MasterWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        kept = {id(p) for module in model.modules() if isinstance(module, KEPT_IN_FP32)
                for p in module.parameters(recurse=False)}
        self.slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []  # module, name, master, copy
        self.copies: dict[nn.Parameter, nn.Parameter] = {}  # master -> its bf16 copy (one per tied parameter)
        self.after_accumulate: dict[nn.Parameter, list[Callable[[nn.Parameter], None]]] = {}
        for module in model.modules():
            for name, master in list(module._parameters.items()):
                if master is None or id(master) in kept or not master.requires_grad or master.dim() < 2:
                    continue
                if master not in self.copies:
                    copy = nn.Parameter(master.detach().to(dtype))
                    copy.register_post_accumulate_grad_hook(partial(self._accumulate, master))
                    self.copies[master] = copy
                self.slots.append((module, name, master, self.copies[master]))
                module._parameters[name] = self.copies[master]

    def _accumulate(self, master: nn.Parameter, copy: nn.Parameter) -> None:
        if master.grad is None:
            master.grad = copy.grad.to(master.dtype)
        else:
            master.grad.add_(copy.grad)
        copy.grad = None
        for hook in self.after_accumulate.get(master, ()):
            hook(master)

    def register_post_accumulate_grad_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> None:
        """`hook(param)` after each backward's gradient reached `param` (a master: after its fp32 gradient grew;
        any other parameter: autograd's own hook)."""
        if param in self.copies:
            self.after_accumulate.setdefault(param, []).append(hook)
        else:
            param.register_post_accumulate_grad_hook(hook)

    @contextmanager
    def masters(self) -> Iterator[None]:
        """The fp32 masters in their modules (for the optimizer step, the gradient sync, checkpoints, loads)."""
        for module, name, master, _ in self.slots:
            module._parameters[name] = master
        try:
            yield
        finally:
            for module, name, _, copy in self.slots:
                module._parameters[name] = copy

    @torch.no_grad()
    def refresh(self) -> None:
        """The bf16 copies from the masters (after an optimizer step or a load)."""
        if self.copies:
            torch._foreach_copy_(list(self.copies.values()), list(self.copies))

    def num_copied(self) -> int:
        return sum(master.numel() for master in self.copies)
