"""LoRA adapters on the plain model: they start as a no-op, merging them changes no output, only they train, and
target patterns that name nothing (or something that is not a linear layer) are errors."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.config import ModelConfig
from pretrain.model.init import initial_value
from pretrain.model.lora import LoraConfig, LoRALinear, apply_lora, freeze_base, merge_lora, set_adapters_enabled

CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def adapted(rank=4, targets=None, seed=0):
    torch.manual_seed(seed)
    model = CFG.build().eval()
    lora = LoraConfig(rank=rank, alpha=8.0, targets=targets or LoraConfig().targets)
    rules = apply_lora(model, lora)
    for name, rule in rules.items():
        model.get_parameter(name).data.copy_(initial_value(name, rule, seed))
    return model, rules


def test_adapters_start_as_a_no_op_and_merge_without_changing_outputs():
    torch.manual_seed(1)
    plain = CFG.build().eval()
    model, rules = adapted()
    model.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)  # B = 0: exactly the base
        for name in rules:
            if name.endswith("lora_b"):
                model.get_parameter(name).normal_(0, 0.05)
        adapted_out = model(ids)
        assert (adapted_out - plain(ids)).abs().max() > 1e-3  # the adapters now change the output
        set_adapters_enabled(model, False)
        torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)
        set_adapters_enabled(model, True)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(plain.state_dict())
        torch.testing.assert_close(merged(ids), adapted_out, rtol=0, atol=1e-5)


def test_default_targets_are_the_attention_and_mlp_projections_and_only_adapters_train():
    model, rules = adapted()
    adapted_modules = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    projections = {f"layers.{i}.{part}" for i in range(2) for part in
                   ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                    "mlp.down_proj")}
    assert adapted_modules == projections
    assert set(rules) == {f"{m}.{ab}" for m in projections for ab in ("lora_a", "lora_b")}
    assert rules["layers.0.attn.k_proj.lora_b"].shape == (CFG.n_kv_heads * CFG.head_dim, 4)
    trainable = freeze_base(model)
    assert set(trainable) == set(rules)
    ids = torch.randint(0, 128, (2, 16))
    model.train()
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(rules)


def test_targets_by_pattern_and_their_errors():
    model, rules = adapted(targets=["layers.1.attn.q_proj"])
    assert set(rules) == {"layers.1.attn.q_proj.lora_a", "layers.1.attn.q_proj.lora_b"}
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(CFG.build(), LoraConfig(rank=2, targets=["*.qkv"]))
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_lora(CFG.build(), LoraConfig(rank=2, targets=["layers.0.attn"]))
    with pytest.raises(ValueError, match="output head"):
        apply_lora(CFG.build(), LoraConfig(rank=2, targets=["lm_head"]))


def test_adapter_dropout_applies_in_training_only():
    torch.manual_seed(0)
    model = CFG.build()
    rules = apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    for name, rule in rules.items():
        model.get_parameter(name).data.copy_(initial_value(name, rule, 0))
        if name.endswith("lora_b"):
            model.get_parameter(name).data.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        model.train()
        first, second = model(ids), model(ids)
        assert (first - second).abs().max() > 1e-4  # a new mask each forward
        model.eval()
        evaluated = model(ids)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.dropout = torch.nn.Identity()
        torch.testing.assert_close(model(ids), evaluated, rtol=0, atol=0)  # eval mode: no dropout
