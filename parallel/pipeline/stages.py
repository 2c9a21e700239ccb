"""Cut a rank's pipeline stages out of the plain (possibly tensor-parallel) model.

The model object stays the owner of every module this rank keeps, so parameter names are the full model's
(`layers.5.attn.q_proj.weight` on whichever rank holds layer 5) and checkpoints stay layout-free. Layers of
other ranks are replaced by empty `nn.Identity`s, and the embedding, final norm and head are dropped where
unused. With tied embeddings, or MTP modules (which embed tokens), the last stage keeps a copy of the `embed`
module (its name stays `embed.weight`); that copy's gradient is summed with the first stage's every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from pretrain.model.documents import Documents


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: it is sent to the previous stage, and p2p sends
    need contiguous buffers (sequence-parallel collectives hand back strided ones)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class StageModule(nn.Module):
    """One pipeline stage: [embedding] → its blocks → [final norm → LM head]."""

    def __init__(self, model: nn.Module, layer_ids: range, first: bool, last: bool, seq_len: int):
        super().__init__()
        self.first, self.last = first, last
        self.layer_ids = layer_ids
        self.seq_len = seq_len
        # the last stage's copy of the embedding (tied head, or MTP's inputs) is this stage's: the schedule scales it
        self.embed = model.embed if first or (last and last_stage_holds_embedding(model.cfg)) else None
        self.blocks = nn.ModuleList(model.layers[i] for i in layer_ids)
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        # run by the loss on the last stage, but their parameters are this stage's (the schedule scales them)
        self.mtp = model.mtp if last else None
        object.__setattr__(self, "_model", model)  # for RoPE tables; not a submodule
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # document masking: the documents of the micro-batch being run (set by the runner before each forward;
        # activations travel between stages, the document ids each stage has from its own data feed)
        self.documents: Documents | None = None

    def forward(self, x: torch.Tensor):
        """Hidden states for the next stage; on the last stage the logits, and in training with MTP modules
        (logits, last hidden state) for the loss function, which runs them."""
        with self.autocast():
            h = self.embed(x) if self.first else _ContiguousGrad.apply(x)
            h = self._model.forward_layers(h, self.blocks, self.seq_len, documents=self.documents)
            if self.last:
                logits = self.lm_head(self.norm(h))
                mtp = len(self._model.mtp) and self._model.train_mtp and self._model.training
                return (logits, h) if mtp else logits
            return h.contiguous()  # sent to the next stage as is


def last_stage_holds_embedding(cfg) -> bool:
    """The last stage needs the embedding too: as the tied head's weight, or to embed the multi-token-prediction
    modules' input tokens (DeepSeek-V3 shares the embedding with its MTP modules). Its copy's gradient is summed
    with the first stage's every step, so both stay equal."""
    return cfg.tie_embeddings or cfg.mtp_depth > 0


def prune_model(model: nn.Module, kept_layers: set[int], has_first: bool, has_last: bool) -> None:
    """Drop from `model` everything this rank's stages do not use (in place)."""
    for i in range(len(model.layers)):
        if i not in kept_layers:
            model.layers[i] = nn.Identity()
    if not has_first and not (has_last and last_stage_holds_embedding(model.cfg)):
        model.embed = None
    if not has_last:
        model.norm = None
        model.lm_head = None
        model.mtp = nn.ModuleList()  # the multi-token-prediction modules live on the last stage
