"""DPO in the training step: the policy (the model being trained) and a frozen reference (the weights the phase
started from) score the same packed pairs; the loss per pair compares their summed reply log-probabilities."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from pretrain.config import PreferenceConfig
from pretrain.model.lora import set_adapters_enabled
from pretrain.model.preference_loss import chosen_and_rejected, dpo_loss, sequence_logprobs, token_logprobs

METRICS = ("chosen_rewards", "rejected_rewards", "reward_margin", "reward_accuracy")


class Reference:
    """The frozen reference model, computed by the policy's own modules (so under any parallel layout) in eval mode
    (no dropout; the MoE layers count no expert loads, this is not a training step): with a copy of the weights the
    phase started from, or, for a LoRA policy, with its adapters switched off and no copy at all."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor] | None):
        self.model, self.weights = model, weights

    def __call__(self, *args):
        model, training = self.model, self.model.training
        if self.weights is None:
            set_adapters_enabled(model, False)
        model.eval()
        try:
            return model(*args) if self.weights is None else functional_call(model, self.weights, args)
        finally:
            set_adapters_enabled(model, True)
            model.train(training)


class PreferenceObjective:
    def __init__(self, cfg: PreferenceConfig, max_documents: int, logprobs=token_logprobs):
        """`logprobs`: (logits, labels) -> per-token log-probabilities (vocabulary-parallel under TP)."""
        self.cfg = cfg
        self.max_documents = max_documents
        self.logprobs = logprobs
        self.reference: Reference | None = None

    def take_reference(self, model: nn.Module, adapters: bool = False) -> None:
        """The reference: the model's current weights, frozen (call it before training changes them); a LoRA
        policy (`adapters`) is its own reference with the adapters switched off."""
        weights = None
        if not adapters:  # this rank's shards of every parameter (tied ones once) and buffer
            weights = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self.reference = Reference(model, weights)

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
        policy = sequence_logprobs(policy_logits, labels, document_ids, self.max_documents, logprobs=self.logprobs)
        reference = sequence_logprobs(reference_logits, labels, document_ids, self.max_documents,
                                      logprobs=self.logprobs)
        losses, metrics = dpo_loss(*chosen_and_rejected(policy, labels, document_ids),
                                   *chosen_and_rejected(reference, labels, document_ids),
                                   self.cfg.beta, self.cfg.label_smoothing, self.cfg.loss)
        return losses.mean(), torch.stack([metrics[name].sum() for name in METRICS])
