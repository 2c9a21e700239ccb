"""Activation recomputation (`train.activation_checkpointing`: full or selective): the same loss, gradients and MoE
statistics as without it; with full recomputation only the blocks' inputs are kept for the backward (what selective
keeps is checked against the memory planner in tests/parallel/test_memory_plan.py)."""

import pytest
import torch

from pretrain.config import load_config
from pretrain.model.loss import lm_loss

SMALL = ["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
         "model.moe.expert_hidden=32", "model.n_layers=3", "data.seq_len=64"]


def step(cfg, recompute: str, tokens: torch.Tensor):
    torch.manual_seed(0)
    model = cfg.model.build()
    model.recompute = recompute
    model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        logits = model(tokens, tokens)
        loss, _ = lm_loss(logits, tokens)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    moe = {n: (m.load_since_update.clone(), m.stats_since_update.clone()) for n, m in model.moe_layers().items()}
    return loss.detach(), grads, moe, sum(saved)


@pytest.mark.parametrize("recompute", ["full", "selective"])
@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/tiny_moe.yaml"], ids=["dense", "moe + mtp"])
def test_recomputed_blocks_give_the_same_step(config, recompute):
    cfg = load_config(config, SMALL, check_paths=False)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    loss, grads, moe, kept = step(cfg, "none", tokens)
    loss_r, grads_r, moe_r, kept_r = step(cfg, recompute, tokens)
    assert torch.equal(loss, loss_r)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=0, atol=1e-7, msg=name)
    for name, (load, stats) in moe.items():  # the recomputation counts nothing twice
        assert torch.equal(moe_r[name][0], load) and torch.equal(moe_r[name][1], stats), name
    if recompute == "full":
        assert kept_r < kept / 2  # only the blocks' inputs (and the head's tensors) stay
