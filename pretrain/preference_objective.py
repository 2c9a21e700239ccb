"""DPO in the training step: the policy (the model being trained) and a frozen reference (the weights the phase
started from) score the same packed pairs; the loss per pair compares their summed reply log-probabilities."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pretrain.config import PreferenceConfig
from pretrain.model.lora import set_adapters_enabled
from pretrain.model.preference_loss import chosen_and_rejected, dpo_loss, sequence_logprobs

METRICS = ("chosen_rewards", "rejected_rewards", "reward_margin", "reward_accuracy")


class BaseOfAdapted:
    """Calls a LoRA-adapted model as its frozen base: adapters off, in eval mode (no dropout, and the MoE layers
    count no expert loads: the reference's forward is not a training step)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model, training = self.model, self.model.training
        set_adapters_enabled(model, False)
        model.eval()
        try:
            return model(*args, **kwargs)
        finally:
            set_adapters_enabled(model, True)
            model.train(training)


class PreferenceObjective:
    def __init__(self, cfg: PreferenceConfig, max_documents: int):
        self.cfg = cfg
        self.max_documents = max_documents
        self.reference: nn.Module | None = None

    def take_reference(self, model: nn.Module, adapters: bool = False) -> None:
        """A frozen copy of the model's current weights (call it before training changes them); a LoRA policy
        (`adapters`) is its own reference with the adapters switched off, and needs no copy."""
        if adapters:
            self.reference = BaseOfAdapted(model)
        else:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def pairs_in(labels: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
        """The number of pairs in a batch of windows (those whose chosen reply has a supervised token)."""
        documents = int(document_ids.max()) + 1
        chosen, _ = chosen_and_rejected(torch.zeros(labels.shape[0], documents + documents % 2,
                                                    device=labels.device), labels, document_ids)
        return torch.tensor(chosen.numel(), device=labels.device)

    def loss(self, policy_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
             document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss over this micro-batch's pairs, and the sums over its pairs of each of METRICS."""
        policy = sequence_logprobs(policy_logits, labels, document_ids, self.max_documents)
        reference = sequence_logprobs(reference_logits, labels, document_ids, self.max_documents)
        losses, metrics = dpo_loss(*chosen_and_rejected(policy, labels, document_ids),
                                   *chosen_and_rejected(reference, labels, document_ids),
                                   self.cfg.beta, self.cfg.label_smoothing, self.cfg.loss)
        return losses.mean(), torch.stack([metrics[name].sum() for name in METRICS])
