"""Multi-token prediction: depth k embeds token i+k and predicts token i+k+1; its loss reaches the gradient."""

import torch

from pretrain.model import ModelConfig, Transformer, lm_loss
from pretrain.model.flops import count_parameters
from pretrain.model.moe import MoEConfig
from pretrain.model.mtp import mtp_inputs_and_targets


def test_depth_k_embeds_token_i_plus_k_and_predicts_token_i_plus_k_plus_1():
    tokens = torch.arange(10).unsqueeze(0)  # token at position t is t
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]  # what the loader gives: labels[i] = x[i+1]
    seq = input_ids.shape[1]
    for depth in (1, 2, 3):
        embedded, targets = mtp_inputs_and_targets(labels, depth)
        assert embedded.shape == targets.shape == labels.shape  # full length: positions line up with the main model
        positions = torch.arange(seq - depth)
        assert torch.equal(embedded[0, : seq - depth], positions + depth), depth
        assert torch.equal(targets[0, : seq - depth], positions + depth + 1), depth
        assert (targets[0, seq - depth :] == -100).all() and (embedded[0, seq - depth :] == 0).all(), depth


def test_ignored_labels_stay_ignored_targets():
    labels = torch.tensor([[5, -100, 7, 8]])
    embedded, targets = mtp_inputs_and_targets(labels, 1)
    assert torch.equal(embedded, torch.tensor([[5, 0, 7, 0]]))
    assert torch.equal(targets, torch.tensor([[-100, 7, 8, -100]]))


def tiny(**overrides) -> Transformer:
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, mtp_depth=2,
                      mtp_weight=0.5, **overrides)
    torch.manual_seed(0)
    return Transformer(cfg)


def test_mtp_loss_joins_the_gradient_of_the_logits_with_the_trainers_scale():
    model = tiny()
    model.train()
    model.aux_loss_scale = 0.25
    ids = torch.randint(0, 50, (3, 12))
    labels = torch.randint(0, 50, (3, 12))
    logits = model(ids, labels)
    (logits * 0).sum().backward()  # only the injected MTP loss sends gradients
    got = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("mtp.")}
    assert all(g.abs().max() > 0 for g in got.values())

    model.zero_grad()
    hidden = model.forward_layers(model.embed(ids), model.layers, 12)
    cos, sin = model.rope(12)
    losses, h = [], hidden
    for depth, module in enumerate(model.mtp, start=1):  # the definition: depth k on positions i < T - k only
        h = module(h[:, : 12 - depth], model.embed(labels[:, depth - 1 : 11]), cos, sin)
        losses.append(lm_loss(model.lm_head(module.norm(h)), labels[:, depth:])[0])
    (0.25 * 0.5 * torch.stack(losses).mean()).backward()
    for name, grad in got.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name
    assert torch.allclose(torch.stack(model.last_mtp_losses), torch.stack(losses).detach())


def test_inference_and_eval_use_the_main_model_only():
    model = tiny()
    ids = torch.randint(0, 50, (2, 8))
    model.eval()
    plain = model(ids)
    assert torch.equal(model(ids, torch.randint(0, 50, (2, 8))), plain)
    model.train()
    with torch.no_grad():
        assert torch.allclose(model(ids, torch.randint(0, 50, (2, 8))), plain)


def test_parameter_counts_with_and_without_mtp():
    model = tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8))
    cfg = model.cfg
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    without = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert count_parameters(cfg, include_mtp=False) == without
    assert set(model.moe_layers()) == {"layers.0", "layers.1", "mtp.0", "mtp.1"}
