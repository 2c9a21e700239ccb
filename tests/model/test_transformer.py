"""The plain model: causality, sliding window, RoPE, GQA, tying, init, counts, loss, and that it learns."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import ModelConfig, Transformer, count_parameters, flops_per_token, lm_loss
from pretrain.model.config import MLAConfig
from pretrain.model.flops import count_parameters_non_embedding
from pretrain.model.moe import MoEConfig
from pretrain.model.rope import apply_rope, rope_cos_sin, rope_frequencies

# small MLA sizes (d_model 64, 4 heads), also used by tests/model/test_mla.py
SMALL_MLA = MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def build(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


# the attention variants the causality and window tests run on: GQA, and MLA inside an MoE + MTP model
ATTENTION = {
    "gqa": {},
    "mla + moe + mtp": {"attention": "mla", "mla": SMALL_MLA, "n_kv_heads": 4, "mtp_depth": 1,
                        "moe": MoEConfig(num_experts=4, top_k=2, expert_hidden=16)},
}


@pytest.mark.parametrize("variant", list(ATTENTION))
def test_causal_future_tokens_do_not_change_past_logits(variant):
    model = build(**ATTENTION[variant])
    ids = torch.randint(0, 128, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 128
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


@pytest.mark.parametrize("variant", list(ATTENTION))
def test_sliding_window_limits_what_a_position_sees(variant):
    model = build(sliding_window=4, **ATTENTION[variant])
    ids = torch.randint(0, 128, (1, 20))
    base = model(ids)
    far = ids.clone()
    far[0, 0] = (far[0, 0] + 1) % 128
    # With 2 layers of window 4, position 15 can be reached from at most 6 positions back.
    assert torch.allclose(model(far)[0, 15:], base[0, 15:], atol=1e-6)
    near = ids.clone()
    near[0, 13] = (near[0, 13] + 1) % 128
    assert not torch.allclose(model(near)[0, 15], base[0, 15], atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    inv_freq = rope_frequencies(tiny().rope, 16)
    cos, sin = rope_cos_sin(inv_freq, 64)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 16), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, 16), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    assert torch.allclose(score(7, 3), score(37, 33), atol=1e-4)
    assert torch.allclose(score(20, 20), (q * k).sum(), atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


def repeat_kv(model: Transformer, groups: int) -> Transformer:
    """The MHA model equal to a GQA one: each KV head's weights repeated for its query heads."""
    mha = Transformer(tiny(n_kv_heads=model.cfg.n_heads)).eval()
    state = copy.deepcopy(model.state_dict())
    hd = model.cfg.head_dim
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[key].view(-1, hd, state[key].shape[1])
            state[key] = w.repeat_interleave(groups, dim=0).reshape(-1, w.shape[2])
    mha.load_state_dict(state)
    return mha


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build(n_kv_heads=2)
    ids = torch.randint(0, 128, (2, 12))
    assert torch.allclose(gqa(ids), repeat_kv(gqa, 2)(ids), atol=1e-5)


def test_gqa_with_as_many_groups_as_heads_is_mha():
    mha = build(n_kv_heads=4)
    ids = torch.randint(0, 128, (2, 12))
    assert torch.allclose(mha(ids), repeat_kv(mha, 1)(ids), atol=1e-6)
    # and it differs from a GQA model that shares KV heads
    assert not torch.allclose(mha(ids), build(n_kv_heads=2)(ids), atol=1e-3)


def test_tied_and_untied_embeddings():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_init_is_deterministic_and_scaled():
    a, b = build(seed=3), build(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    cfg = tiny(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4)
    m = Transformer(cfg)
    assert m.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "ffn_hidden": 96}])
def test_parameter_count_formula_matches_model(kw):
    cfg = tiny(**kw)
    model = Transformer(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    emb = cfg.vocab_size * cfg.d_model
    assert count_parameters(cfg, include_embedding=False) == count_parameters(cfg) - emb
    assert count_parameters_non_embedding(cfg) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("embed", "lm_head"))
    )


def test_flops_per_token_hand_computed():
    cfg = ModelConfig(vocab_size=100, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16)
    # q 8x8, k 8x4, v 8x4, o 8x8, mlp 3x8x16, head 100x8
    n = 64 + 32 + 32 + 64 + 384 + 800
    assert flops_per_token(cfg, 10) == 6 * n + 12 * 1 * 8 * 10
    assert flops_per_token(ModelConfig(**{**cfg.__dict__, "sliding_window": 4}), 10) == 6 * n + 12 * 8 * 4


def test_loss_matches_hand_computation_with_smoothing_zloss_and_ignore():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 0] = -100
    loss, m = lm_loss(logits, labels)
    logp = logits.log_softmax(-1)
    valid = labels != -100
    nll = -logp[valid].gather(-1, labels[valid].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(loss, nll.mean(), atol=1e-6) and torch.allclose(m["ce"], nll.mean(), atol=1e-6)

    smoothed, m2 = lm_loss(logits, labels, label_smoothing=0.1)
    expected = 0.9 * nll.mean() + 0.1 * (-logp[valid].mean(-1)).mean()
    assert torch.allclose(smoothed, expected, atol=1e-6)
    assert torch.allclose(m2["ce"], nll.mean(), atol=1e-6)

    with_z, m3 = lm_loss(logits, labels, z_loss=1e-2)
    z = (torch.logsumexp(logits, -1)[valid] ** 2).mean()
    assert torch.allclose(with_z, nll.mean() + 1e-2 * z, atol=1e-6)
    assert torch.allclose(m3["z_loss"], z, atol=1e-6)


def test_bf16_autocast_gives_fp32_loss():
    model = build()
    ids = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    loss, _ = lm_loss(logits, ids)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny())
    ids = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 128), ids[:, 1:].reshape(-1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > math.log(128) * 0.9
    assert loss.item() < 0.1 * first
