"""Self-speculative decoding with the MTP modules produces exactly greedy decoding's tokens, in fewer main-model
forwards when the drafts are right."""

import torch

from pretrain.generate import draft_with_mtp, greedy, self_speculative
from pretrain.model import ModelConfig, Transformer, lm_loss


def model_with_mtp(depth: int = 2) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                   mtp_depth=depth))


def test_speculative_equals_greedy_even_with_wrong_drafts():
    model = model_with_mtp()
    prompt = torch.randint(0, 16, (1, 5))
    want, greedy_stats = greedy(model, prompt, 20)
    got, stats = self_speculative(model, prompt, 20)
    assert torch.equal(got, want)
    assert greedy_stats.main_forwards == 20
    assert stats.drafted > 0 and stats.main_forwards <= 20


def test_drafts_use_the_training_offsets_and_a_trained_model_gets_a_speedup():
    """Train main model and MTP on a cycle 0,1,...,15,0,1,...: the token k steps ahead is determined, so a
    correctly wired draft is always accepted (an off-by-one in the drafting offsets would not be)."""
    model = model_with_mtp(depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        start = torch.randint(0, 16, (8, 1))
        seq = (start + torch.arange(33)) % 16
        loss, _ = lm_loss(model(seq[:, :-1], seq[:, 1:]), seq[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prompt = torch.tensor([[3, 4, 5, 6]])
    want, _ = greedy(model, prompt, 24)
    assert torch.equal(want[0, 4:], (torch.arange(7, 31)) % 16)  # it learned the cycle
    model.eval()
    hidden = model.forward_layers(model.embed(prompt), model.layers, 4)
    assert draft_with_mtp(model, prompt, hidden, torch.tensor([[7]])).tolist() == [[8, 9]]
    got, stats = self_speculative(model, prompt, 24)
    assert torch.equal(got, want)
    assert stats.acceptance_rate == 1.0
    assert stats.main_forwards <= 24 // 3 + 1  # three tokens per forward: t1 and two accepted drafts
