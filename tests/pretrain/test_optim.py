import math

import pytest
from torch import nn

from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer, lr_at


def test_cosine_warmup_then_decay_to_min():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_at(mid, 100, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_wsd_is_flat_then_decays_linearly():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(4, 100, cfg) == pytest.approx(1.0)
    assert all(lr_at(s, 100, cfg) == pytest.approx(1.0) for s in range(5, 80))
    assert lr_at(89, 100, cfg) == pytest.approx(0.5)
    assert lr_at(99, 100, cfg) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(model[0].weight) in decayed and id(model[1].weight) in decayed
    assert id(model[1].bias) not in decayed and id(model[2].weight) not in decayed
