"""The DPO loss: hand-worked values (sigmoid, label-smoothed, IPO), ln 2 where policy and reference agree,
per-document log-probabilities of a packed window against a plain loop, pairs lined up per window, gradients only
where supervised."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.chat_dataset import IGNORE_INDEX, collate_chat_windows
from pretrain.model.preference_loss import chosen_and_rejected, dpo_loss, sequence_logprobs

# Two pairs of summed log-probabilities: the policy prefers the chosen reply more than the reference does in the first,
# less in the second.
POLICY_CHOSEN, POLICY_REJECTED = [-10.0, -20.0], [-12.0, -18.0]
REFERENCE_CHOSEN, REFERENCE_REJECTED = [-11.0, -19.0], [-11.5, -18.5]
BETA = 0.1


def pairs(*values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_sigmoid_loss_and_rewards_equal_the_hand_computed_values():
    losses, metrics = dpo_loss(*pairs(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED), BETA)
    # first pair: h = (-10 - -12) - (-11 - -11.5) = 2 - 0.5 = 1.5; second: (-20 - -18) - (-19 - -18.5) = -2 + 0.5
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.15), -log_sigmoid(-0.15)], rel=1e-12)
    assert metrics["chosen_rewards"].tolist() == pytest.approx([0.1 * 1.0, 0.1 * -1.0], rel=1e-12)
    assert metrics["rejected_rewards"].tolist() == pytest.approx([0.1 * -0.5, 0.1 * 0.5], rel=1e-12)
    assert metrics["reward_margin"].tolist() == pytest.approx([0.15, -0.15], rel=1e-12)
    assert metrics["reward_accuracy"].tolist() == [1.0, 0.0]


def test_label_smoothing_is_conservative_dpo():
    smoothing = 0.2
    losses, _ = dpo_loss(*pairs(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED), BETA,
                         label_smoothing=smoothing)
    expected = [-(1 - smoothing) * log_sigmoid(x) - smoothing * log_sigmoid(-x) for x in (0.15, -0.15)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_ipo_loss_equals_the_hand_computed_value():
    losses, _ = dpo_loss(*pairs(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED), BETA,
                         kind="ipo")
    assert losses.tolist() == pytest.approx([(1.5 - 5.0) ** 2, (-1.5 - 5.0) ** 2], rel=1e-12)  # 1 / (2 beta) = 5


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_where_policy_and_reference_agree_the_loss_is_ln_2(smoothing):
    torch.manual_seed(0)
    chosen = (-50 * torch.rand(6, dtype=torch.float64)).requires_grad_()
    rejected = -50 * torch.rand(6, dtype=torch.float64)
    losses, metrics = dpo_loss(chosen, rejected, chosen.detach(), rejected, beta=0.5, label_smoothing=smoothing)
    assert losses.tolist() == pytest.approx([math.log(2)] * 6, rel=1e-12)
    (gradient,) = torch.autograd.grad(losses.sum(), chosen)
    assert gradient.tolist() == pytest.approx([-0.5 * (1 - 2 * smoothing) / 2] * 6, rel=1e-12)
    assert metrics["reward_margin"].abs().max() == 0 and metrics["reward_accuracy"].sum() == 0


def test_bad_settings_are_refused():
    args = pairs(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)
    with pytest.raises(ValueError, match="kind must be one of"):
        dpo_loss(*args, BETA, kind="hinge")
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(*args, 0.0)
    with pytest.raises(ValueError, match="IPO takes none"):
        dpo_loss(*args, BETA, label_smoothing=0.1, kind="ipo")


# Two packed windows of 16 tokens: (document, length, supervised tail) per document; the last one is padding.
WINDOWS = [[(0, 5, 2), (1, 4, 3), (2, 3, 1), (3, 2, 1), (4, 2, 0)],
           [(0, 6, 3), (1, 7, 4), (2, 3, 0)]]
VOCAB = 11


def packed_batch() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    windows = []
    for g, documents in enumerate(WINDOWS):
        ids = np.concatenate([np.full(length, number) for number, length, _ in documents])
        supervised = np.concatenate([np.arange(length) >= length - tail for _, length, tail in documents])
        windows.append((g, rng.integers(0, VOCAB, len(ids)), supervised, ids))
    return collate_chat_windows(windows)


def test_sequence_logprobs_of_a_packed_window_are_the_per_document_sums():
    batch = packed_batch()
    torch.manual_seed(0)
    logits = torch.randn(2, 15, VOCAB, dtype=torch.bfloat16)
    sums = sequence_logprobs(logits, batch["labels"], batch["document_ids"], max_documents=6)
    assert sums.dtype == torch.float32 and sums.shape == (2, 6)
    expected = [[0.0] * 6 for _ in range(2)]
    for b in range(2):
        for t in range(15):
            label = int(batch["labels"][b, t])
            if label != IGNORE_INDEX:
                row = [float(x) for x in logits[b, t]]
                log_prob = row[label] - math.log(sum(math.exp(x) for x in row))
                expected[b][int(batch["document_ids"][b, t])] += log_prob
    assert sums.tolist()[0] == pytest.approx(expected[0], rel=1e-5)
    assert sums.tolist()[1] == pytest.approx(expected[1], rel=1e-5)
    assert sums[0, 4:].tolist() == [0.0, 0.0] and sums[1, 2:].tolist() == [0.0] * 4  # padding, absent documents
    with pytest.raises(ValueError, match="belongs to document 3, but max_documents is 3"):
        sequence_logprobs(logits, batch["labels"], batch["document_ids"], max_documents=3)


def test_pairs_are_lined_up_window_by_window():
    batch = packed_batch()
    sums = torch.arange(12.0).view(2, 6)
    chosen, rejected = chosen_and_rejected(sums, batch["labels"], batch["document_ids"])
    assert chosen.tolist() == [0.0, 2.0, 6.0] and rejected.tolist() == [1.0, 3.0, 7.0]


def test_gradients_reach_the_logits_of_supervised_positions_only():
    batch = packed_batch()
    torch.manual_seed(0)
    policy_logits = torch.randn(2, 15, VOCAB, requires_grad=True)
    reference_logits = torch.randn(2, 15, VOCAB)
    labels, documents = batch["labels"], batch["document_ids"]
    policy = chosen_and_rejected(sequence_logprobs(policy_logits, labels, documents, 6), labels, documents)
    reference = chosen_and_rejected(sequence_logprobs(reference_logits, labels, documents, 6), labels, documents)
    losses, _ = dpo_loss(*policy, *reference, beta=0.1)
    losses.sum().backward()
    reached = policy_logits.grad.abs().sum(dim=-1) > 0
    assert torch.equal(reached, labels != IGNORE_INDEX)
