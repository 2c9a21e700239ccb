"""The MoE layer: routing, grouped experts against a plain loop, capacity dropping, balancing and its losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import ModelConfig, Transformer
from pretrain.model.flops import count_parameters
from pretrain.model.moe import MoE, MoEConfig


def make_moe(**overrides) -> MoE:
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 16, **overrides})
    torch.manual_seed(0)
    layer = MoE(d_model=12, dense_ffn=32, cfg=cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def dense_reference(layer: MoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every token through each of its experts one by one, as written in the papers."""
    e = layer.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            i = int(ids[t, slot])
            h = F.silu(x[t] @ e.gate[i]) * (x[t] @ e.up[i])
            out[t] += weights[t, slot] * (h @ e.down[i])
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out


def test_router_picks_the_top_k_scores_and_normalizes_their_weights():
    layer = make_moe(score_func="sigmoid")
    x = torch.randn(20, 12)
    _, scores = layer.router.scores(x)
    ids, weights = layer.router.select(scores)
    assert torch.equal(ids.sort(-1).values, scores.topk(2, dim=-1).indices.sort(-1).values)
    expected = scores.gather(1, ids)
    assert torch.allclose(weights, expected / expected.sum(-1, keepdim=True))
    assert torch.allclose(weights.sum(-1), torch.ones(20))


def test_bias_changes_the_choice_but_not_the_weights():
    layer = make_moe()
    x = torch.randn(30, 12)
    _, scores = layer.router.scores(x)
    layer.router.expert_bias[5] = 10.0  # expert 5 is now always picked ...
    ids, weights = layer.router.select(scores)
    assert (ids == 5).any(-1).all()
    # ... but weighted by its unbiased score
    assert torch.allclose(weights, scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True))


def test_group_limited_routing_stays_inside_the_best_groups():
    layer = make_moe(n_groups=4, topk_groups=1, top_k=2)
    x = torch.randn(50, 12)
    _, scores = layer.router.scores(x)
    ids, _ = layer.router.select(scores)
    groups = ids // 2  # 8 experts in 4 groups of 2
    assert (groups[:, 0] == groups[:, 1]).all()
    best_group = scores.view(50, 4, 2).sum(-1).argmax(-1)  # group score = sum of its best two (here: both)
    assert torch.equal(groups[:, 0], best_group)


@pytest.mark.parametrize("shared", [0, 1])
def test_dropless_grouped_experts_equal_a_loop_over_experts(shared):
    layer = make_moe(num_shared_experts=shared)
    x = torch.randn(2, 7, 12, requires_grad=True)
    out = layer(x)
    flat = x.reshape(-1, 12)
    _, scores = layer.router.scores(flat)
    ids, weights = layer.router.select(scores)
    ref = dense_reference(layer, flat, ids, weights).view(2, 7, 12)
    assert torch.allclose(out, ref, atol=1e-5)
    assert int(layer.last_stats["dropped"]) == 0
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.experts.gate, layer.experts.down, layer.router.weight], grad)
    want = torch.autograd.grad(ref, [x, layer.experts.gate, layer.experts.down, layer.router.weight], grad)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-4), (g - w).abs().max()


def test_capacity_drops_the_assignments_beyond_it_in_token_order():
    layer = make_moe(capacity_factor=0.5)
    layer.router.expert_bias[:2] = 100.0  # every token picks experts 0 and 1
    x = torch.randn(1, 16, 12)
    out = layer(x)
    capacity = math.ceil(0.5 * 16 * 2 / 8)  # 2 tokens per expert
    assert int(layer.last_stats["dropped"]) == 2 * (16 - capacity)
    flat = x.reshape(-1, 12)
    _, scores = layer.router.scores(flat)
    ids, weights = layer.router.select(scores)
    ref = dense_reference(layer, flat[:capacity], ids[:capacity], weights[:capacity])
    assert torch.allclose(out[0, :capacity], ref, atol=1e-5)
    assert torch.equal(out[0, capacity:], torch.zeros_like(out[0, capacity:]))  # dropped: no contribution


def test_bias_balancing_evens_out_a_skewed_router():
    layer = make_moe(bias_update_rate=0.02, score_func="sigmoid")
    with torch.no_grad():
        layer.router.weight[0] += 2.0 * torch.ones(12)  # expert 0 is favored by inputs with a positive mean
    layer.train()
    g = torch.Generator().manual_seed(1)

    def imbalance() -> float:
        layer(torch.randn(4, 32, 12, generator=g) + 0.5)
        return float(layer.last_stats["imbalance"])

    before = imbalance()
    layer.load_since_update.zero_()
    for _ in range(300):
        imbalance()
        layer.bias_update()
    after = sum(imbalance() for _ in range(10)) / 10
    assert before > 2.0
    assert after < 1.5, (before, after)


def test_balance_and_z_losses_join_the_gradient_through_the_output():
    layer = make_moe(aux_loss_weight=0.1, router_z_loss=0.01)
    layer.train()
    x = torch.randn(2, 5, 12)
    out = layer(x)
    balance, z = layer.last_stats["balance_loss"], layer.last_stats["router_z_loss"]
    # DeepSeek-V3's sequence-wise loss, written out
    logits, scores = layer.router.scores(x.reshape(-1, 12))
    ids, _ = layer.router.select(scores)
    chosen = F.one_hot(ids, 8).sum(1).view(2, 5, 8).float()
    f = chosen.sum(1) * 8 / (2 * 5)
    p = (scores / scores.sum(-1, keepdim=True)).view(2, 5, 8).mean(1)
    assert torch.allclose(balance, (f * p).sum(-1).mean())
    assert torch.allclose(z, torch.logsumexp(logits, -1).pow(2).mean())
    # the output's value is unchanged; its backward adds d(aux)/d(router) scaled by aux_loss_scale
    layer.aux_loss_scale = 0.5
    layer.router.weight.grad = None
    (layer(x) * 0).sum().backward()  # only the auxiliary losses reach the router
    router_grad = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    logits, scores = layer.router.scores(x.reshape(-1, 12))
    aux = 0.1 * (f * (scores / scores.sum(-1, keepdim=True)).view(2, 5, 8).mean(1)).sum(-1).mean()
    aux = aux + 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    (0.5 * aux).backward()
    assert router_grad.abs().max() > 0
    assert torch.allclose(router_grad, layer.router.weight.grad, atol=1e-6)
    layer.eval()
    assert torch.allclose(layer(x), out, atol=1e-6)  # the injection never changes the value


def test_moe_model_parameter_counts():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1, first_k_dense=1))
    model = Transformer(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert len(model.moe_layers()) == 2
    expert = 3 * 32 * 8
    assert count_parameters(cfg) - count_parameters(cfg, active=True) == 2 * (4 - 2) * expert
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64)


def test_grouped_mm_loop_fallback_equals_torch_grouped_mm():
    """The per-group loop (used where torch has no grouped GEMM for the device and dtype) computes the same
    products as torch's grouped_mm, for the output and for the weight-gradient form."""
    from pretrain.model.moe import _TORCH_GROUPED_MM, _grouped_mm_loop, grouped_mm

    torch.manual_seed(0)
    ends = torch.tensor([3, 3, 10, 16], dtype=torch.int32)  # an empty group included
    x, w, g = torch.randn(16, 8), torch.randn(4, 8, 12), torch.randn(16, 12)
    assert torch.allclose(_grouped_mm_loop(x, w, ends), _TORCH_GROUPED_MM(x, w, offs=ends), atol=1e-5)
    assert torch.allclose(_grouped_mm_loop(x.t(), g, ends), _TORCH_GROUPED_MM(x.t(), g, offs=ends), atol=1e-5)
    odd = torch.randn(4, 8, 5)  # rows of 20 bytes: torch refuses, the loop computes it
    assert torch.allclose(grouped_mm(x, odd, ends)[3:10], x[3:10] @ odd[2], atol=1e-5)
