"""The DPO loss (Rafailov et al. 2023, "Direct Preference Optimization") over packed preference windows.

A window holds whole pairs (data/preference_dataset.py): its k-th pair's chosen reply is document 2k, the rejected
one document 2k+1, and only the replies' tokens are supervised. `sequence_logprobs` sums each document's
supervised log-probabilities, `chosen_and_rejected` lines the pairs up, and `dpo_loss` compares the policy's sums with
the frozen reference model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_KINDS = ("sigmoid", "ipo")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] fp32: log p(label) at every position, 0 where the label is `ignore_index`."""
    batch, length, vocab = logits.shape
    return -F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index,
                            reduction="none").view(batch, length)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor, max_documents: int,
                      ignore_index: int = -100, logprobs=token_logprobs) -> torch.Tensor:
    """[B, max_documents] fp32: per window and document, the summed log-probability of the document's supervised
    tokens (`labels` not `ignore_index`; a position belongs to the document of its input token). Documents without a
    supervised token get 0. Every supervised position's document must be below `max_documents`. `logprobs`:
    (logits, labels) -> per-token log-probabilities (tensor parallelism passes its vocabulary-parallel one)."""
    batch = logits.shape[0]
    per_token = logprobs(logits, labels)
    supervised = labels != ignore_index
    documents = document_ids.masked_fill(~supervised, 0)
    highest = int(documents.max()) if documents.numel() else 0
    if highest >= max_documents:
        raise ValueError(f"a supervised token belongs to document {highest}, but max_documents is {max_documents}: "
                         "pass at least twice the most pairs a window holds")
    sums = torch.zeros(batch, max_documents, dtype=torch.float32, device=logits.device)
    return sums.scatter_add(1, documents, per_token)


def chosen_and_rejected(document_logprobs: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of a batch of windows, flattened window by window: ([P] chosen, [P] rejected) from the
    [B, max_documents] sums, taking documents (2k, 2k+1) of each window for every k whose chosen reply has a
    supervised token (a real pair, not padding or an absent document)."""
    batch, max_documents = document_logprobs.shape
    pairs = max_documents // 2
    supervised = labels != ignore_index
    documents = document_ids.masked_fill(~supervised, 0)
    counts = torch.zeros(batch, max_documents, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, documents, supervised.long())
    present = counts[:, 0:2 * pairs:2] > 0
    return document_logprobs[:, 0:2 * pairs:2][present], document_logprobs[:, 1:2 * pairs:2][present]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0, kind: str = "sigmoid"
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses from summed log-probabilities of the chosen and rejected replies ([P] each), and per-pair
    metrics (detached): chosen_rewards and rejected_rewards (beta * (policy - reference), the implicit rewards),
    reward_margin (their difference) and reward_accuracy (1 where the chosen reward is higher, else 0).

    With h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected):
      sigmoid  -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h): the DPO paper's loss, with eps =
               `label_smoothing` the conservative DPO of Hugging Face TRL (eps: the chance a pair's labels are
               flipped; eps = 0 is plain DPO);
      ipo      (h - 1 / (2 * beta))^2, as TRL writes IPO (Azar et al. 2023). TRL's IPO averages the log-probabilities
               over each reply's tokens; here h is made of summed log-probabilities, like the sigmoid loss, so the
               target margin 1 / (2 * beta) applies to whole replies and beta wants setting accordingly.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"DPO loss kind must be one of {DPO_KINDS}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"the DPO beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind == "ipo" and label_smoothing:
        raise ValueError("label smoothing is for the sigmoid DPO loss; IPO takes none")
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    h = chosen_logratios - rejected_logratios
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
               "reward_margin": chosen_rewards - rejected_rewards,
               "reward_accuracy": (chosen_rewards > rejected_rewards).float()}
    return losses, metrics
