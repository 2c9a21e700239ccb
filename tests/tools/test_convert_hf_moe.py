"""Hugging Face export of GQA + DeepSeek-style MoE models as transformers' Glm4MoeForCausalLM (tools/convert_hf.py),
checked through transformers itself, offline: the exported folder loads with no missing, unexpected or reshaped
weight and gives our logits (fp32) and greedy tokens with routing that is not trivial (random nonzero selection
biases that change which experts are chosen, 4 expert groups of which 2 are kept, routed scaling, a dense first
layer, shared experts); each expert's linears are our stacked slices transposed; what Glm4Moe cannot compute
exactly is refused by name and leaves no output. MLA + MoE models export as DeepseekV3ForCausalLM (rope_interleave
true: our rotate-half rope rows written interleaved, as DeepSeek's checkpoints) with our logits and greedy tokens,
with and without query compression, under YaRN with mscale_all_dim; their MTP modules, written in DeepSeek-V3's
layout, compute our MTP logits when run the DeepSeek way through transformers' own decoder layer; --mtp drop leaves
them out (a Glm4Moe export keeps them by default; tests/tools/test_convert_hf_mtp.py runs both architectures' MTP
layers through transformers' MTP speculative decoding and imports them back). A Glm4Moe folder saved by transformers
imports to its logits and exports back bit-identically; so does a DeepseekV3 one (either rope layout in,
interleaved out)."""

import json
from pathlib import Path

import pytest
import torch

from data.tokenizer import tokenizer_sha256
from pretrain.checkpoint import CheckpointManager, model_tensors, pieces
from pretrain.config import Config, DataConfig, config_to_yaml
from pretrain.model.config import MLAConfig, ModelConfig, RopeConfig
from pretrain.model.moe import MoE, MoEConfig
from tests.tools.test_convert_hf import (
    FP32_TOLERANCE,
    assert_no_output,
    assert_same_greedy,
    compare_logits,
    ours,
    safetensors_of,
    small_model,
)
from tools.convert_hf import export_hf
from tools.hf import ConversionError

ROUTING = MoEConfig(num_experts=8, top_k=3, expert_hidden=32, num_shared_experts=1, first_k_dense=1,
                    score_func="sigmoid", norm_topk=True, routed_scaling=2.5, n_groups=4, topk_groups=2)


def moe_model(**changes) -> ModelConfig:
    moe = MoEConfig(**ROUTING.__dict__ | changes.pop("moe", {}))
    return small_model(**{"n_layers": 3, "tie_embeddings": False, "moe": moe} | changes)


def save_moe_checkpoint(folder: Path, model: ModelConfig, tokenizer: Path, random_norms: bool = False) -> Path:
    """Freshly initialized (seed 0), with random nonzero selection biases of the size of the sigmoid scores'
    spread, so that they change which experts are chosen; `random_norms`: every RMSNorm weight random in [0.5, 1.5]
    instead of ones (so that a norm applied twice, skipped or swapped changes the result)."""
    torch.manual_seed(0)
    built = model.build()
    with torch.no_grad():
        for layer in built.moe_layers().values():
            layer.router.expert_bias.copy_(torch.randn(model.moe.num_experts) * 0.3)
        for module in built.modules() if random_norms else []:
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
    cfg = Config(model=model, data=DataConfig(seq_len=64))
    state = {"tokenizer": {"path": str(tokenizer), "sha256": tokenizer_sha256(tokenizer)}}
    return CheckpointManager(folder).save(7, pieces(model_tensors(built), {}), state, config_to_yaml(cfg),
                                          layout={"world_size": 1}).wait()


@pytest.fixture(scope="module")
def moe_export(tiny_data, tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("moe")
    checkpoint = save_moe_checkpoint(root / "run", moe_model(), tiny_data / "tokenizer.json")
    return checkpoint, root / "hf", export_hf(checkpoint, root / "hf", verify=True)


@torch.no_grad()
def test_routing_in_the_test_model_is_not_trivial(moe_export):
    """The selection biases and the group limit change which experts tokens go to (so a wrong mapping of either
    changes the logits)."""
    model = ours(moe_export[0])
    layer = model.layers[1].mlp
    assert isinstance(layer, MoE) and not isinstance(model.layers[0].mlp, MoE)
    assert layer.router.expert_bias.abs().min() > 0
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(5))
    _, scores = layer.router.scores(x)
    ids, _ = layer.router.select(scores)
    bias = layer.router.expert_bias.clone()
    layer.router.expert_bias.zero_()
    unbiased, _ = layer.router.select(scores)
    layer.router.expert_bias.copy_(bias)
    ungrouped = (scores + bias).topk(3, dim=-1).indices
    changed = lambda other: (ids.sort(-1).values != other.sort(-1).values).any(-1).float().mean()  # noqa: E731
    print(f"tokens whose experts the bias changes: {changed(unbiased):.2f}, the group limit: {changed(ungrouped):.2f}")
    assert changed(unbiased) > 0.5 and changed(ungrouped) > 0.5, (changed(unbiased), changed(ungrouped))


def test_moe_export_gives_our_logits_and_greedy_tokens(moe_export):
    checkpoint, folder, record = moe_export
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    parity = compare_logits(checkpoint, folder, ids)
    print(f"Glm4Moe, 8 experts top-3, 4 groups keep 2, biased: {parity}; verify: {record['parity']}")
    assert record["parity"]["max_abs_diff"] < FP32_TOLERANCE
    generated = assert_same_greedy(checkpoint, folder, [ids[0, :9].tolist(), ids[1, :4].tolist()], new_tokens=16)
    assert max(len(tokens) for tokens in generated) >= 10


def test_moe_config_and_tensors_map_exactly(moe_export):
    checkpoint, folder, record = moe_export
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["model_type"] == "glm4_moe"
    assert {k: config[k] for k in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                                   "n_shared_experts", "first_k_dense_replace", "norm_topk_prob",
                                   "routed_scaling_factor", "n_group", "topk_group", "use_qk_norm",
                                   "attention_bias", "intermediate_size")} == {
        "n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 32, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 4,
        "topk_group": 2, "use_qk_norm": False, "attention_bias": False, "intermediate_size": 192}
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    theirs, mine = safetensors_of(folder), model_tensors(ours(checkpoint))
    for i in (1, 2):
        for e in range(8):
            for part in ("gate", "up", "down"):
                name = f"model.layers.{i}.mlp.experts.{e}.{part}_proj.weight"
                assert torch.equal(theirs[name], mine[f"layers.{i}.mlp.experts.{part}"][e].t()), name
        assert torch.equal(theirs[f"model.layers.{i}.mlp.gate.e_score_correction_bias"],
                           mine[f"layers.{i}.mlp.router.expert_bias"])
    assert "model.layers.0.mlp.gate_proj.weight" in theirs and "model.layers.0.mlp.gate.weight" not in theirs
    assert len(theirs) == len(mine) - 2 * 3 + 2 * 3 * 8  # two MoE layers' 3 stacks -> 8 linears each
    assert record["target"]["architecture"] == "Glm4MoeForCausalLM"
    assert record["routing"]["model.moe.n_groups"] == "n_group"


def test_other_routing_settings_and_bf16_export_verified(tiny_data, tmp_path):
    """No groups, unnormalized top-k weights, two shared experts, tied embeddings, bf16 weights (the router's
    weight and bias stay float32, as transformers keeps them)."""
    model = moe_model(tie_embeddings=True, moe={"n_groups": 1, "topk_groups": 1, "norm_topk": False,
                                                "num_shared_experts": 2, "routed_scaling": 1.0, "first_k_dense": 0})
    checkpoint = save_moe_checkpoint(tmp_path / "run", model, tiny_data / "tokenizer.json")
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(4))
    export_hf(checkpoint, tmp_path / "fp32")
    print(f"Glm4Moe, no groups, unnormalized, tied: {compare_logits(checkpoint, tmp_path / 'fp32', ids)}")
    record = export_hf(checkpoint, tmp_path / "bf16", dtype=torch.bfloat16, verify=True)
    print(f"Glm4Moe bf16 weights, verify: {record['parity']}")
    tensors = safetensors_of(tmp_path / "bf16")
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.float32
    assert tensors["model.layers.0.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.0.mlp.experts.3.down_proj.weight"].dtype == torch.bfloat16
    assert record["parity"]["max_abs_diff"] < FP32_TOLERANCE


REFUSED = {
    "capacity": ({"moe": {"capacity_factor": 1.25}}, "capacity_factor: 1.25 drops tokens"),
    "no-shared": ({"moe": {"num_shared_experts": 0}}, "without shared experts"),
    "one-per-group": ({"moe": {"n_groups": 8, "topk_groups": 4}}, "one expert per group"),
    "sliding-window": ({"sliding_window": 16}, "sliding-window attention"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_glm4_moe_cannot_compute_is_refused_by_name_and_leaves_no_output(name, tiny_data, tmp_path):
    """(Softmax routing exports as MixtralForCausalLM or is refused by its reasons: test_convert_hf_mixtral.py.)"""
    changes, message = REFUSED[name]
    checkpoint = save_moe_checkpoint(tmp_path / "run", moe_model(**changes), tiny_data / "tokenizer.json")
    with pytest.raises(ConversionError, match=f"{message}.*Glm4MoeForCausalLM"):
        export_hf(checkpoint, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")


MLA = MLAConfig(q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
DEEPSEEK = {  # (model changes, what it shows)
    "q-lora": ({}, "query compression, 4 groups keep 2, biased"),
    "plain-q-yarn": ({"mla": MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=16,
                                       v_head_dim=16),
                      "rope": RopeConfig(scaling="yarn", factor=4, original_max_seq_len=32, mscale=1.0,
                                         mscale_all_dim=1.0),
                      "max_seq_len": 32, "tie_embeddings": True,
                      "moe": {"n_groups": 1, "topk_groups": 1, "norm_topk": False}},
                     "plain q_proj, YaRN x4 with mscale_all_dim (softmax scale), tied, no groups"),
}


def mla_model(**changes) -> ModelConfig:
    return moe_model(**{"attention": "mla", "mla": MLA, "norm_eps": 1e-6} | changes)


@pytest.mark.parametrize("name", list(DEEPSEEK))
def test_mla_moe_export_as_deepseek_v3_gives_our_logits_and_greedy_tokens(name, tiny_data, tmp_path):
    changes, what = DEEPSEEK[name]
    model = mla_model(**changes)
    checkpoint = save_moe_checkpoint(tmp_path / "run", model, tiny_data / "tokenizer.json")
    folder = tmp_path / "hf"
    record = export_hf(checkpoint, folder, verify=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["rope_interleave"] is True
    assert (config["q_lora_rank"], config["qk_rope_head_dim"]) == (model.mla.q_lora_rank or None,
                                                                  model.mla.qk_rope_head_dim)
    assert (config["n_group"], config["routed_scaling_factor"]) == (model.moe.n_groups, model.moe.routed_scaling)
    assert "equal transformers" in record["rope"]["check"]
    length = model.rope.max_supported_seq_len(model.max_seq_len)
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(6))
    parity = compare_logits(checkpoint, folder, ids)
    print(f"DeepseekV3, {what}, 2 x {length} tokens: {parity}")
    generated = assert_same_greedy(checkpoint, folder, [ids[0, :9].tolist(), ids[1, :4].tolist()], new_tokens=16)
    assert max(len(tokens) for tokens in generated) >= 10


MLA_REFUSED = {
    "dense-mla": ({"moe": {"num_experts": 0}}, "without Mixture-of-Experts"),
    "norm-eps": ({"norm_eps": 1e-5}, "RMSNorm eps 1e-05"),
    "softmax": ({"moe": {"score_func": "softmax"}}, "softmax routing"),
}


@pytest.mark.parametrize("name", list(MLA_REFUSED))
def test_what_deepseek_v3_cannot_compute_is_refused_by_name_and_leaves_no_output(name, tiny_data, tmp_path):
    changes, message = MLA_REFUSED[name]
    checkpoint = save_moe_checkpoint(tmp_path / "run", mla_model(**changes), tiny_data / "tokenizer.json")
    with pytest.raises(ConversionError, match=f"{message}.*DeepseekV3ForCausalLM"):
        export_hf(checkpoint, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, weight.shape, weight, 1e-6)


@torch.no_grad()
def test_mtp_modules_in_deepseek_v3_layout_compute_ours_and_drop_leaves_them_out(tiny_data, tmp_path):
    """The MTP module written as model.layers.3 (enorm, hnorm, eh_proj, shared_head, the block) and run the
    DeepSeek-V3 way, [enorm(embedding), hnorm(hidden)] -> eh_proj -> transformers' own DeepseekV3DecoderLayer ->
    shared_head, gives our MTP logits; the main model still gives ours; --mtp drop writes no model.layers.3."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    from tools.hf.parity import load_transformers_model

    model = mla_model(mtp_depth=1)
    checkpoint = save_moe_checkpoint(tmp_path / "run", model, tiny_data / "tokenizer.json")
    folder = tmp_path / "hf"
    record = export_hf(checkpoint, folder, verify=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 3
    tensors = safetensors_of(folder)
    layer = {k.removeprefix("model.layers.3."): v for k, v in tensors.items() if k.startswith("model.layers.3.")}
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight"):
        assert name in layer, name
    assert torch.equal(layer["shared_head.head.weight"], tensors["lm_head.weight"])
    assert torch.equal(layer["embed_tokens.weight"], tensors["model.embed_tokens.weight"])

    ours_model = ours(checkpoint)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(7))
    next_tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(8))
    hidden = ours_model.forward_layers(ours_model.embed(ids), ours_model.layers, 64)
    cos, sin, _ = ours_model.attention_inputs(64)
    module = ours_model.mtp[0]
    expected = ours_model.lm_head(module.norm(module(hidden, ours_model.embed(next_tokens), cos, sin)))

    theirs = load_transformers_model(folder)  # the MTP layer's weights are expected unused
    block = DeepseekV3DecoderLayer(theirs.config, layer_idx=3).eval()
    experts = range(model.moe.num_experts)
    weights = {k: v for k, v in layer.items() if not k.startswith(("mlp.experts.", "enorm", "hnorm", "eh_proj",
                                                                   "shared_head", "embed_tokens"))}
    weights["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
        [layer[f"mlp.experts.{e}.gate_proj.weight"], layer[f"mlp.experts.{e}.up_proj.weight"]]) for e in experts])
    weights["mlp.experts.down_proj"] = torch.stack([layer[f"mlp.experts.{e}.down_proj.weight"] for e in experts])
    block.load_state_dict(weights, strict=True)
    x = torch.cat([rms(layer["embed_tokens.weight"][next_tokens], layer["enorm.weight"]),
                   rms(hidden, layer["hnorm.weight"])], dim=-1) @ layer["eh_proj.weight"].t()
    positions = torch.arange(64)[None].expand(2, -1)
    out = block(x, attention_mask=None, position_ids=positions,
                position_embeddings=theirs.model.rotary_emb(x, positions))
    got = rms(out, layer["shared_head.norm.weight"]) @ layer["shared_head.head.weight"].t()
    diff = float((got - expected).abs().max())
    print(f"DeepseekV3 MTP layer run the DeepSeek way vs ours: max abs diff {diff:.2e}; main: {record['parity']}")
    assert diff < FP32_TOLERANCE and record["mtp"]["written"] == 1

    record = export_hf(checkpoint, tmp_path / "dropped", mtp="drop", verify=True)
    config = json.loads((tmp_path / "dropped" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and record["mtp"] == {
        "depth": 1, "written": 0, "note": "left out (--mtp drop)"}
    assert not [k for k in safetensors_of(tmp_path / "dropped") if k.startswith("model.layers.3.")]


def test_cli_keeps_the_mtp_modules_of_a_glm4_moe_export_and_drops_them_with_a_notice(tiny_data, tmp_path, capsys):
    """By default the MTP layer is written (model.layers.3, num_nextn_predict_layers 1; tests/tools/
    test_convert_hf_mtp.py checks it through transformers' MTP decoding); --mtp drop leaves it out, with a notice."""
    from pretrain.cli import main

    checkpoint = save_moe_checkpoint(tmp_path / "run", moe_model(mtp_depth=1), tiny_data / "tokenizer.json")
    assert main(["convert", "export-hf", str(checkpoint), str(tmp_path / "kept"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "left out" not in out and "verified with transformers" in out
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["tie_last_hidden_states"] is False
    assert "model.layers.3.eh_proj.weight" in safetensors_of(tmp_path / "kept")
    assert json.loads((tmp_path / "kept" / "conversion.json").read_text())["mtp"]["written"] == 1
    assert main(["convert", "export-hf", str(checkpoint), str(tmp_path / "hf"), "--mtp", "drop", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "MTP module(s) are left out (--mtp drop)" in out and "verified with transformers" in out
    assert json.loads((tmp_path / "hf" / "conversion.json").read_text())["target"]["architecture"] == (
        "Glm4MoeForCausalLM")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and "tie_last_hidden_states" not in config
    assert not [k for k in safetensors_of(tmp_path / "hf") if k.startswith("model.layers.3.")]


def glm4_moe_folder(folder: Path, tokenizer: Path, **changes) -> Path:
    """A Glm4MoeForCausalLM saved by transformers, with random nonzero selection biases."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(**{
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5, "initializer_range": 0.2, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128, "num_mtp_layers": 0, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 1.0}} | changes)
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def test_a_glm4_moe_folder_saved_by_transformers_imports_to_its_logits_and_exports_back_bit_identical(
        tiny_data, tmp_path):
    from tools.convert_hf import import_hf

    source = glm4_moe_folder(tmp_path / "source", tiny_data / "tokenizer.json")
    checkpoint = import_hf(source, tmp_path / "imported")
    ids = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(9))
    print(f"imported Glm4Moe: {compare_logits(checkpoint, source, ids)}")
    export_hf(checkpoint, tmp_path / "back")
    theirs, back = safetensors_of(source), safetensors_of(tmp_path / "back")
    assert sorted(theirs) == sorted(back)
    assert all(torch.equal(theirs[name], back[name]) and theirs[name].dtype == back[name].dtype for name in theirs)


def test_our_moe_export_imports_and_exports_back_bit_identical(moe_export, tmp_path):
    from tools.convert_hf import import_hf

    checkpoint, folder, _ = moe_export
    imported = import_hf(folder, tmp_path / "imported")
    export_hf(imported, tmp_path / "again")
    first, again = safetensors_of(folder), safetensors_of(tmp_path / "again")
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("changes,message", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "partial_rotary_factor 0.5"),
    ({"use_qk_norm": True}, "use_qk_norm: true"),
], ids=["partial-rope-default", "qk-norm"])
def test_a_glm4_moe_folder_our_model_cannot_compute_is_refused_on_import(changes, message, tiny_data, tmp_path):
    from tools.convert_hf import import_hf

    source = glm4_moe_folder(tmp_path / "source", tiny_data / "tokenizer.json", **changes)
    with pytest.raises(ConversionError, match=message):
        import_hf(source, tmp_path / "imported")
    assert_no_output(tmp_path / "imported")


def deepseek_v3_folder(folder: Path, tokenizer: Path, **changes) -> Path:
    """A DeepseekV3ForCausalLM saved by transformers, with random nonzero selection biases."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "moe_intermediate_size": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "initializer_range": 0.1, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128, "num_mtp_layers": 0, "bos_token_id": 0,
        "eos_token_id": 1, "pad_token_id": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
        | changes)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


@pytest.mark.parametrize("interleave", [True, False], ids=["rope-interleave", "rope-rotate-half"])
def test_a_deepseek_v3_folder_saved_by_transformers_imports_to_its_logits_and_exports_back(
        interleave, tiny_data, tmp_path):
    """Either rope layout imports to its logits; exported back (always interleaved), an interleaved folder comes
    back bit-identical, a rotate-half one with its logits and only the rope rows moved."""
    from tools.convert_hf import import_hf

    source = deepseek_v3_folder(tmp_path / "source", tiny_data / "tokenizer.json", rope_interleave=interleave)
    checkpoint = import_hf(source, tmp_path / "imported")
    ids = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(10))
    print(f"imported DeepseekV3, rope_interleave {interleave}: {compare_logits(checkpoint, source, ids)}")
    export_hf(checkpoint, tmp_path / "back")
    compare_logits(checkpoint, tmp_path / "back", ids)
    theirs, back = safetensors_of(source), safetensors_of(tmp_path / "back")
    assert sorted(theirs) == sorted(back)
    moved = sorted(name for name in theirs if not torch.equal(theirs[name], back[name]))
    assert moved == ([] if interleave else sorted(name for name in theirs if name.endswith(
        ("q_b_proj.weight", "kv_a_proj_with_mqa.weight"))))


@pytest.mark.parametrize("changes,message", [
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps 1e-05"),
], ids=["norm-eps"])
def test_a_deepseek_v3_folder_our_model_cannot_compute_is_refused_on_import(changes, message, tiny_data, tmp_path):
    from tools.convert_hf import import_hf

    source = deepseek_v3_folder(tmp_path / "source", tiny_data / "tokenizer.json", **changes)
    with pytest.raises(ConversionError, match=message):
        import_hf(source, tmp_path / "imported")
    assert_no_output(tmp_path / "imported")
