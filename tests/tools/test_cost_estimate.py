"""`pretrain cost estimate`: the FLOPs convention against hand-computed counts, the GPU table, and the published
figures it should reproduce (Llama 3.1 405B's 3.8e25 FLOPs; DeepSeek-V3's 2.664M H800 GPU-hours)."""

import json
import subprocess
import sys

import pytest

from cluster.gpu_specs import GPUS, UnknownGPUError, lookup, match_device
from pretrain.cli import main
from pretrain.model.config import MLAConfig, ModelConfig
from pretrain.model.moe import MoEConfig
from tools.cost_estimate import estimate, mfu_for_hours, parse_tokens, training_flops

# vocab 100, d 16, 2 layers, 4 heads of 4 (2 KV heads), FFN 32, sequences of 8
SMALL = dict(vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=32, max_seq_len=8)
SMALL_YAML = """model: {vocab_size: 100, d_model: 16, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_hidden: 32,
  max_seq_len: 8}
data: {seq_len: 8}
"""


@pytest.mark.parametrize(("text", "tokens"), [
    ("15.6T", 15_600_000_000_000), ("14.8T", 14_800_000_000_000), ("2B", 2_000_000_000), ("500m", 500_000_000),
    ("10K", 10_000), ("1.5e12", 1_500_000_000_000), ("123,456", 123_456), ("0.5G", 500_000_000)])
def test_token_counts_with_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["15.6X", "abc", "", "T", "-2B", "0", "1.5", "nan", "inf"])
def test_malformed_token_counts(text):
    with pytest.raises(ValueError, match="token"):
        parse_tokens(text)


def test_gqa_flops_by_hand():
    f = training_flops(ModelConfig(**SMALL), seq_len=8, tokens=1000)
    # matmul weights: attention q 16x16 + k 16x8 + v 16x8 + o 16x16 = 768, MLP 3 x 16 x 32 = 1536, per layer 2304;
    # 2 layers 4608, LM head 100 x 16 = 1600 (the embedding lookup is not counted): N = 6208, 6N = 37248
    assert f.matmul_parameters == 6208 and f.dense_per_token == 37248
    # QK^T and AV: forward 2 x 4 heads x (4 + 4) x 8 keys = 512 per layer, x3 for training, x2 layers = 3072
    assert f.attention_per_token == 3072
    assert f.per_token == 40320 and f.total == 40_320_000
    # a sliding window of 4 caps the keys: half the attention term
    windowed = training_flops(ModelConfig(**SMALL, sliding_window=4), seq_len=8, tokens=1000)
    assert windowed.per_token == 37248 + 1536


def test_moe_counts_only_the_routed_experts_by_hand():
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1, first_k_dense=1)
    f = training_flops(ModelConfig(**SMALL, moe=moe), seq_len=8, tokens=1)
    # layer 0 dense (1536); layer 1: router 4 x 16 = 64, 2 of 4 routed experts x 3 x 16 x 8 = 768, 1 shared 384
    assert f.matmul_parameters == 2 * 768 + 1536 + (64 + 768 + 384) + 1600 == 5888
    assert f.per_token == 6 * 5888 + 3072
    assert f.parameters > f.active_parameters  # the two idle experts are parameters, not work


def test_mla_flops_by_hand():
    mla = MLAConfig(q_lora_rank=8, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4)
    f = training_flops(ModelConfig(**{**SMALL, "n_heads": 2}, attention="mla", mla=mla), seq_len=8, tokens=1)
    # q: 16x8 down + 8 x 2 heads x (4+2) up = 224; kv: 16 x (4+2) down + 4 x 2 x (4+4) up = 160; o: 2x4x16 = 128
    assert f.matmul_parameters == 2 * (224 + 160 + 128 + 1536) + 1600
    # scores: 2 x 2 heads x (qk 6 + v 4) x 8 keys = 320 forward per layer; x3, x2 layers
    assert f.attention_per_token == 3 * 2 * 320


def test_hours_days_dollars_energy_by_hand(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL_YAML)
    est = estimate(tmp_path / "small.yaml", 2_000_000_000_000, "a100", gpus=4, mfu=0.5, price_per_gpu_hour=1.5,
                   pue=1.2, grid_kgco2_per_kwh=0.25)
    hours = 40320 * 2e12 / (312e12 * 0.5) / 3600  # FLOPs / (peak x MFU) in hours: 143.59 GPU-hours
    assert est.gpu_hours == pytest.approx(hours, rel=1e-12)
    assert est.wall_days == pytest.approx(hours / 4 / 24, rel=1e-12)
    assert est.dollars == pytest.approx(1.5 * hours, rel=1e-12)
    assert est.energy.kwh == pytest.approx(hours * 0.400 * 1.2, rel=1e-12)  # A100 SXM: 400 W
    assert est.energy.tonnes_co2 == pytest.approx(hours * 0.400 * 1.2 * 0.25 / 1000, rel=1e-12)
    # --seq-len 4 instead of the config's 8: half the attention term (37248 + 1536 FLOPs/token)
    assert estimate(tmp_path / "small.yaml", 1000, "A100", 1, seq_len=4).flops.total == 1000 * (37248 + 1536)


def test_llama3_405b_at_15_6t_tokens_is_meta_s_3_8e25_flops():
    est = estimate("configs/llama3_405b.yaml", parse_tokens("15.6T"), "H100", 16384)
    assert est.flops.parameters == 405_853_388_800  # "405B"
    # Meta's 3.8e25 (arXiv 2407.21783) is 6 x 405B x 15.6T = 3.79e25, rounded to two figures: our 6N part must
    # agree within that rounding (+-1.5%)...
    assert est.flops.dense_total == pytest.approx(3.8e25, rel=0.015)
    # ...and the attention term over the full 8,192-token context adds 7.7% on top (halved for the causal mask it
    # would be 3.9%): the total lies above 3.8e25, within 10%
    assert est.flops.attention_per_token / est.flops.per_token == pytest.approx(0.0773, abs=1e-4)
    assert 3.8e25 < est.flops.total < 1.10 * 3.8e25
    print(f"Llama 3.1 405B, 15.6T tokens: {est.flops.total:.4g} FLOPs ({est.flops.dense_total:.4g} of them 6N)")


def test_the_mfu_at_which_deepseek_v3_takes_2_664m_h800_hours():
    tokens, hours = parse_tokens("14.8T"), 2_664_000
    flops = estimate("configs/deepseek_v3.yaml", tokens, "H800", 2048).flops
    assert flops.seq_len == 4096
    mfu = {p: mfu_for_hours(flops.total, lookup("H800").peak(p), hours) for p in ("fp8", "bf16")}
    print(f"DeepSeek-V3, 14.8T tokens: {flops.total:.4g} FLOPs; 2.664M H800 hours at MFU {mfu['fp8']:.4f} of the FP8 "
          f"peak, {mfu['bf16']:.4f} of the BF16 peak")
    # the figures the README states (they move only if pretrain/model/flops.py's count does)
    assert mfu["fp8"] == pytest.approx(0.2276, abs=1e-4) and mfu["bf16"] == pytest.approx(0.4554, abs=1e-4)
    # plausible for a large MoE run: DeepSeek trained the matmuls in FP8 and the rest in BF16, so the truth lies
    # between the two denominators, and its own MFU is not published
    assert all(0.2 <= m <= 0.5 for m in mfu.values())
    for precision, m in mfu.items():  # the estimate at that MFU gives the hours back
        est = estimate("configs/deepseek_v3.yaml", tokens, "H800", 2048, mfu=m, precision=precision)
        assert est.gpu_hours == pytest.approx(hours, rel=1e-12)
        assert est.wall_days == pytest.approx(hours / 2048 / 24, rel=1e-12)  # 54.2 days on 2,048 GPUs


def test_gpu_table():
    assert lookup("h100-sxm") is GPUS["H100"] and lookup(" H800 ") is GPUS["H800"]
    with pytest.raises(UnknownGPUError, match=r"unknown GPU 'Z100'; known: H100, H800, H200, GB200, B200, A100"):
        lookup("Z100")
    with pytest.raises(UnknownGPUError, match="no FP8"):
        lookup("A100").peak("fp8")
    assert lookup("H800").peak("fp8") == lookup("H100").peak("fp8") == 1979e12  # H800: H100 SXM's compute
    for device, name in [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA GB200", "GB200"), ("NVIDIA B200", "B200"),
                         ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10", "A10"), ("AMD Instinct MI300X", "MI300X")]:
        assert match_device(device).name == name
    assert match_device("NVIDIA GeForce RTX 4090") is None


def test_the_trainers_mfu_table_is_this_one_and_unchanged():
    from pretrain.hardware import GPU_PEAK_FLOPS

    before = {"H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
              "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp32": 91.6e12},
              "A10": {"bf16": 125e12, "fp32": 31.2e12}}
    assert all(GPU_PEAK_FLOPS[name] == peaks for name, peaks in before.items())
    assert list(GPU_PEAK_FLOPS) == list(GPUS)  # one table, in its matching order (A100 before A10)


def test_cli_estimate_json():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "cost", "estimate", "configs/llama3_405b.yaml",
                          "--tokens", "15.6T", "--gpu", "H100", "--gpus", "16384", "--price-per-gpu-hour", "2",
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["tokens"] == 15_600_000_000_000 and data["mfu"] == 0.4 and "not halved" in data["convention"]
    assert data["training_flops"] == pytest.approx(4.0957e25, rel=1e-4)
    assert data["dollars"] == pytest.approx(2 * data["gpu_hours"])


def test_cli_bad_input_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "cost", "estimate", "configs/llama3_405b.yaml",
                          "--tokens", "15.6T", "--gpu", "Z100", "--gpus", "8"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: config error at '--gpu': unknown GPU 'Z100'; known: H100, H800, H200, GB200, B200, A100, MI300X, "
        "L40S, A10"]


@pytest.mark.parametrize(("args", "message"), [
    (["--tokens", "15.6X", "--gpu", "H100", "--gpus", "8"], "'--tokens': '15.6X' is not a token count"),
    (["--tokens", "1T", "--gpu", "A100", "--gpus", "8", "--precision", "fp8"], "A100 has no fp8 peak"),
    (["--tokens", "1T", "--gpu", "H100", "--gpus", "0"], "'--gpus': must be at least 1"),
    (["--tokens", "1T", "--gpu", "H100", "--gpus", "8", "--mfu", "40"], "'--mfu': a fraction"),
    (["--tokens", "1T", "--gpu", "H100", "--gpus", "8", "--pue", "0.5"], "'--pue'"),
])
def test_bad_estimate_options(capsys, args, message):
    assert main(["cost", "estimate", "configs/llama3_405b.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_config(capsys):
    assert main(["cost", "estimate", "configs/nope.yaml", "--tokens", "1T", "--gpu", "H100", "--gpus", "8"]) == 2
    assert "configs/nope.yaml does not exist" in capsys.readouterr().err
