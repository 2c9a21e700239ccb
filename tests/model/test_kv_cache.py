"""The KV cache: decoding position by position (and in chunks, as speculative verification does) gives the logits
of one forward over the whole sequence, for GQA, MLA, a sliding window and MoE; truncating rolls positions back."""

import pytest
import torch

from pretrain.generate import greedy, self_speculative
from pretrain.model import ModelConfig, Transformer
from pretrain.model.config import MLAConfig
from pretrain.model.kv_cache import KVCache
from pretrain.model.moe import MoEConfig

VARIANTS = {
    "gqa": {},
    "mla": {"attention": "mla", "mla": MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                                 qk_rope_head_dim=4, v_head_dim=8)},
    "sliding window": {"sliding_window": 5},
    "moe + mtp": {"moe": MoEConfig(num_experts=4, top_k=2, expert_hidden=16, first_k_dense=1), "mtp_depth": 2},
}


def model(**extra) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                   **extra)).eval()


def incremental_logits(m: Transformer, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache, out, start = KVCache(len(m.layers)), [], 0
    for size in chunks:
        piece = ids[:, start : start + size]
        h = m.forward_layers(m.embed(piece), m.layers, size, cache)
        out.append(m.lm_head(m.norm(h)))
        start += size
    assert cache.length == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_cached_decoding_equals_a_full_forward(variant):
    m = model(**VARIANTS[variant])
    ids = torch.randint(0, 64, (2, 12))
    full = m(ids)
    for chunks in ([5, 1, 1, 1, 1, 1, 1, 1], [4, 3, 1, 4], [12]):
        assert torch.allclose(incremental_logits(m, ids, chunks), full, atol=1e-5), (variant, chunks)


@torch.no_grad()
def test_truncate_rolls_back_rejected_positions():
    m = model()
    ids = torch.randint(0, 64, (1, 10))
    cache = KVCache(len(m.layers))
    m.forward_layers(m.embed(ids[:, :6]), m.layers, 6, cache)
    m.forward_layers(m.embed(torch.randint(0, 64, (1, 3))), m.layers, 3, cache)  # drafts that get rejected
    cache.truncate(6)
    h = m.forward_layers(m.embed(ids[:, 6:]), m.layers, 4, cache)
    assert torch.allclose(m.lm_head(m.norm(h)), m(ids)[:, 6:], atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "moe + mtp"])
def test_decoders_give_the_same_tokens_with_and_without_the_cache(variant):
    m = model(**VARIANTS[variant])
    prompt = torch.randint(0, 64, (1, 6))
    want, plain_stats = greedy(m, prompt, 16, use_cache=False)
    got, cached_stats = greedy(m, prompt, 16)
    assert torch.equal(got, want) and cached_stats.main_forwards == plain_stats.main_forwards == 16
    if m.cfg.mtp_depth:
        (cached, cached_stats), (plain, plain_stats) = (self_speculative(m, prompt, 16, use_cache=c) for c in (1, 0))
        assert torch.equal(cached, want) and torch.equal(plain, want)
        # the MTP caches change no draft: the same drafts are proposed and accepted (a stale cached position would
        # still give greedy's tokens, only with other drafts)
        assert (cached_stats.drafted, cached_stats.accepted) == (plain_stats.drafted, plain_stats.accepted)


@torch.no_grad()
def test_mtp_drafts_with_caches_equal_drafts_without_over_many_rounds():
    from pretrain.generate import MTPDrafter, draft_with_mtp

    m = model(**VARIANTS["moe + mtp"])
    ids = torch.randint(0, 64, (1, 20))
    drafter = MTPDrafter(m)
    for length in (5, 6, 9, 10, 14, 20):  # rounds accepting 1, 3, 1, 4, 6 tokens
        prefix = ids[:, :length - 1]
        hidden = m.forward_layers(m.embed(prefix), m.layers, length - 1)
        first = ids[:, length - 1 : length]
        want = draft_with_mtp(m, prefix, hidden, first)
        assert torch.equal(draft_with_mtp(m, prefix, hidden, first, drafter), want), length
        # what each depth keeps cached equals its states computed afresh from the true tokens: nothing that read a
        # draft (which the next round may reject) stays
        cos, sin, h, L = *m.rope(length - 1), hidden, length - 1
        for depth, module in enumerate(m.mtp, start=1):
            h = module(h, m.embed(ids[:, depth : L + depth]), cos, sin)
            kept = drafter.outputs[depth - 1]
            assert kept.shape[1] == L - depth + 1 and torch.allclose(kept, h[:, : kept.shape[1]], atol=1e-5), length
