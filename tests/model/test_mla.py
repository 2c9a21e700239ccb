"""Multi-head Latent Attention: shapes, RoPE on the rope part only, the softmax scale, exact parameter counts and
FLOPs, training with MoE and MTP, and DeepSeek-V3's published sizes (causality and the sliding window run for
MLA in tests/model/test_transformer.py)."""

import math
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.model import ModelConfig, Transformer, count_parameters, flops_per_token, lm_loss
from pretrain.model.config import MLAConfig
from pretrain.model.flops import attention_parameters, count_parameters_non_embedding, mtp_parameters
from pretrain.model.mla import MLA
from pretrain.model.moe import MoEConfig
from pretrain.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from tests.model.test_transformer import SMALL_MLA

ROOT = Path(__file__).resolve().parents[2]


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=64, attention="mla",
                mla=SMALL_MLA)
    return ModelConfig(**{**base, **kw})


def build(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


def attention_layer(q_lora_rank=24, seed=0) -> tuple[MLA, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    mla = MLA(64, 4, MLAConfig(**{**SMALL_MLA.__dict__, "q_lora_rank": q_lora_rank})).eval()
    cos, sin = rope_cos_sin(rope_frequencies(tiny().rope, 4), 64)
    return mla, cos, sin


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_shapes_and_module_names(q_lora_rank):
    mla, cos, sin = attention_layer(q_lora_rank)
    x = torch.randn(2, 10, 64)
    q, k, v = mla.qkv(x, cos, sin)
    assert q.shape == k.shape == (2, 4, 10, 12) and v.shape == (2, 4, 10, 6)
    assert mla(x, cos, sin).shape == (2, 10, 64)
    names = {n.rsplit(".", 1)[0] for n, _ in mla.named_parameters()}
    query = {"q_a_proj", "q_a_layernorm", "q_b_proj"} if q_lora_rank else {"q_proj"}
    assert names == query | {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}  # Hugging Face's
    assert mla.kv_a_proj_with_mqa.out_features == 16 + 4  # latent | one shared rope key
    model = build(mla=MLAConfig(**{**SMALL_MLA.__dict__, "q_lora_rank": q_lora_rank}))
    assert model(torch.randint(0, 128, (2, 10))).shape == (2, 10, 128)
    assert model.inv_freq.numel() == 2  # RoPE frequencies from qk_rope_head_dim (4), not d_model / n_heads (16)


def test_rope_rotates_the_rope_part_only_and_the_shared_key_is_the_same_for_every_head():
    """The same token at every position: the nope parts of q and k (content) must not depend on the position, and
    the rope parts must be the position-0 vector rotated by RoPE. Fails if RoPE is applied to the whole head, to
    the wrong part, or not at all."""
    mla, cos, sin = attention_layer()
    x = torch.randn(1, 1, 64).expand(1, 12, 64)
    q, k, _ = mla.qkv(x, cos, sin)
    for t in (q, k):
        nope, rope = t[..., :8], t[..., 8:]
        assert torch.allclose(nope, nope[:, :, :1].expand_as(nope), atol=1e-6)
        rotated = apply_rope(rope[:, :, :1].expand_as(rope), cos[:12], sin[:12])  # position 0 is unrotated
        assert torch.allclose(rope, rotated, atol=1e-5)
        assert not torch.allclose(rope[:, :, 5], rope[:, :, 0], atol=1e-3)
    assert torch.allclose(k[..., 8:], k[:, :1, :, 8:].expand_as(k[..., 8:]))  # one rope key for all heads
    # so the scores of the nope part are position-invariant, those of the rope part depend on relative position
    scores = q @ k.transpose(-1, -2)
    nope_scores = q[..., :8] @ k[..., :8].transpose(-1, -2)
    assert torch.allclose(nope_scores, nope_scores[..., :1, :1].expand_as(nope_scores), atol=1e-5)
    assert torch.allclose(scores[..., 7, 3], scores[..., 11, 7], atol=1e-4)
    assert not torch.allclose(scores[..., 7, 3], scores[..., 7, 5], atol=1e-3)


def test_forward_equals_explicit_softmax_attention_with_scale_over_qk_head_dim():
    mla, cos, sin = attention_layer()
    x = torch.randn(2, 9, 64)
    q, k, v = mla.qkv(x, cos, sin)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8 + 4)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)
    expected = mla.o_proj(out.transpose(1, 2).reshape(2, 9, 4 * 6))
    assert torch.allclose(mla(x, cos, sin), expected, atol=1e-5)


def test_init_scales_inputs_and_output():
    torch.manual_seed(0)
    m = Transformer(tiny(n_layers=8, d_model=256, mla=MLAConfig(256, 128, 32, 16, 32)))
    attn = m.layers[0].attn
    for linear in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.kv_b_proj):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(attn.kv_a_layernorm.weight, torch.ones(128))


MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, num_shared_experts=1, first_k_dense=1)


@pytest.mark.parametrize("kw", [
    {}, {"mla": MLAConfig(0, 16, 8, 4, 6)}, {"tie_embeddings": False}, {"mtp_depth": 2, "moe": MOE},
    {"mtp_depth": 1, "moe": MOE, "tie_embeddings": False, "mla": MLAConfig(0, 8, 6, 2, 10)},
])
def test_parameter_count_formula_matches_model(kw):
    cfg = tiny(**kw)
    model = Transformer(cfg)
    params = dict(model.named_parameters())
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg, include_mtp=False) == sum(p.numel() for n, p in params.items()
                                                           if not n.startswith("mtp."))
    assert attention_parameters(cfg) == sum(p.numel() for n, p in params.items() if n.startswith("layers.0.attn."))
    assert count_parameters_non_embedding(cfg) == sum(
        p.numel() for n, p in params.items() if not n.startswith(("embed", "lm_head"))
    )
    if cfg.mtp_depth:
        assert all(isinstance(module.block.attn, MLA) for module in model.mtp)  # MTP blocks use the same attention


def test_flops_per_token_hand_computed():
    mla = MLAConfig(q_lora_rank=4, kv_lora_rank=2, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=5)
    cfg = ModelConfig(vocab_size=100, d_model=8, n_layers=1, n_heads=2, ffn_hidden=16, attention="mla", mla=mla)
    # q_a 8x4, q_b 4x(2*5), kv_a 8x(2+2), kv_b 2x(2*(3+5)), o (2*5)x8, mlp 3x8x16, head 100x8 (norms do no matmul)
    n = 32 + 40 + 32 + 32 + 80 + 384 + 800
    # QK^T over qk_nope + qk_rope = 5 and AV over v_head_dim = 5 per head, 2 heads, context 10
    assert flops_per_token(cfg, 10) == 6 * n + 3 * 2 * 2 * (5 + 5) * 10
    assert count_parameters(cfg) == n + 4 + 2 + 2 * 8 + 8  # + latent norms, block norms, final norm (head tied)


def test_mla_moe_mtp_model_trains():
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=1, moe=MOE, mtp_weight=0.3)).train()
    ids = torch.randint(0, 128, (4, 33))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, _ = lm_loss(model(inputs, labels), labels)
        opt.zero_grad()
        loss.backward()
        assert model.mtp[0].block.attn.kv_b_proj.weight.grad.abs().max() > 0  # the MTP loss reaches its MLA
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(128)
    assert losses[-1] < 0.6 * losses[0] and all(b < a for a, b in zip(losses[:5], losses[1:6], strict=True))
    assert len(model.last_mtp_losses) == 1 and model.last_mtp_losses[0] < losses[0]


def test_bf16_autocast_matches_fp32():
    model = build()
    ids = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), model(ids), atol=5e-2)


# DeepSeek-V3 (configs/deepseek_v3.yaml), counted by us. DeepSeek's published figures and which convention gives them:
TOTAL = 671_026_404_352  # main model incl. embedding and untied head, no MTP -> "671B total parameters"
ACTIVE = 37_552_282_624  # per token with embedding and head, no MTP: 37.55B, which rounds to 38B ...
ACTIVE_NO_EMBEDDING = 36_625_603_584  # ... without the input embedding (a lookup): 36.63B -> "37B activated"
MTP_OWN = 11_610_067_968  # the MTP module's norms, 2d -> d projection and MoE block
MTP_WITH_COPIES = 13_463_426_048  # + the embedding and head that the HF checkpoint stores again in it -> "14B"
CHECKPOINT = 684_489_830_400  # 671B + 13.5B: the HF checkpoint's "685B" (DeepSeek adds the rounded 671B and 14B)


def test_deepseek_v3_counts(tmp_path):
    (tmp_path / "manifest.json").write_text('{"vocab_size": 512}')
    cfg = load_config(ROOT / "configs" / "deepseek_v3.yaml", [f"data.dir={tmp_path}"]).model
    with torch.device("meta"):
        model = cfg.build()
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg) == TOTAL + MTP_OWN
    assert count_parameters(cfg, include_mtp=False) == TOTAL and round(TOTAL / 1e9) == 671
    assert count_parameters(cfg, active=True, include_mtp=False) == ACTIVE and int(ACTIVE / 1e9) == 37
    assert count_parameters(cfg, include_embedding=False, active=True, include_mtp=False) == ACTIVE_NO_EMBEDDING
    assert round(ACTIVE_NO_EMBEDDING / 1e9) == 37
    assert mtp_parameters(cfg) == MTP_OWN and round(MTP_OWN / 1e8) == 116
    assert MTP_WITH_COPIES == MTP_OWN + 2 * cfg.vocab_size * cfg.d_model and round(MTP_WITH_COPIES / 1e9) == 13
    assert TOTAL + MTP_WITH_COPIES == CHECKPOINT and round(CHECKPOINT / 1e9) == 684
    # the HF checkpoint's e_score_correction_bias (a buffer here) adds 256 per MoE layer: no rounded figure moves
    bias = 256 * (61 - 3 + 1)
    assert round((CHECKPOINT + bias) / 1e9) == 684 and round((TOTAL + bias) / 1e9) == 671
    attn = model.layers[0].attn
    assert isinstance(attn, MLA) and attn.q_b_proj.weight.shape == (128 * 192, 1536)
    assert attn.kv_b_proj.weight.shape == (128 * (128 + 128), 512) and attn.o_proj.weight.shape == (7168, 128 * 128)
    assert model.inv_freq.numel() == 32  # RoPE over qk_rope_head_dim 64
