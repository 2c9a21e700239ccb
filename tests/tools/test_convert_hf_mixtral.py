"""Hugging Face export of GQA + softmax top-k MoE models as transformers' MixtralForCausalLM (tools/convert_hf.py,
tools/hf/mixtral_config.py, tools/hf/mixtral_names.py), checked through transformers itself, offline: the exported
folder loads with no missing, unexpected or reshaped weight and gives our logits (fp32) and greedy tokens with
routing that is not trivial (tokens choose different experts; the experts' outputs differ); each expert's w1/w3/w2
are our gate/up/down slices transposed, and swapping w1 and w3 breaks the logits; sliding-window attention and
bf16 weights (the router rounded too) export with our logits. A Mixtral folder saved by transformers imports to
its logits and exports back bit-identically; our export -> import -> export is bit-identical. What Mixtral cannot
compute exactly (shared experts, dense first layers, unnormalized or scaled top-k weights, groups, a capacity, a
nonzero selection bias, MTP modules) is refused by name with the reason and leaves no output."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pretrain.checkpoint import model_tensors
from pretrain.model.moe import MoE, MoEConfig
from tests.tools.test_convert_hf import (
    FP32_TOLERANCE,
    assert_no_output,
    assert_same_greedy,
    compare_logits,
    ours,
    safetensors_of,
    save_checkpoint,
    small_model,
)
from tests.tools.test_convert_hf_moe import save_moe_checkpoint
from tools.convert_hf import export_hf, import_hf
from tools.hf import ConversionError
from tools.hf.parity import load_transformers_model, logits_parity

SOFTMAX = MoEConfig(num_experts=8, top_k=2, expert_hidden=32, score_func="softmax")


def mixtral_model(**changes):
    moe = MoEConfig(**SOFTMAX.__dict__ | changes.pop("moe", {}))
    return small_model(**{"n_layers": 2, "tie_embeddings": False, "moe": moe} | changes)


def save_softmax_checkpoint(folder: Path, model, tokenizer: Path) -> Path:
    """Freshly initialized (seed 0; init_std 0.1, so the router's softmax is far from uniform), with zero selection
    biases, as a run without auxiliary-loss-free balancing has them."""
    return save_checkpoint(folder, model, tokenizer)


@pytest.fixture(scope="module")
def mixtral_export(tiny_data, tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("mixtral")
    checkpoint = save_softmax_checkpoint(root / "run", mixtral_model(), tiny_data / "tokenizer.json")
    return checkpoint, root / "hf", export_hf(checkpoint, root / "hf", verify=True)


@torch.no_grad()
def test_routing_in_the_test_model_is_not_trivial(mixtral_export):
    """Tokens spread over all experts with several distinct top-2 sets, the kept weights are far from equal, and the
    experts compute different things (so a wrong expert order or weight changes the logits)."""
    model = ours(mixtral_export[0])
    layer = model.layers[0].mlp
    assert isinstance(layer, MoE) and isinstance(model.layers[1].mlp, MoE)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(5))
    _, scores = layer.router.scores(x)
    ids, weights = layer.router.select(scores)
    chosen = torch.bincount(ids.reshape(-1), minlength=8)
    pairs = {tuple(sorted(row)) for row in ids.tolist()}
    print(f"tokens per expert {chosen.tolist()}, {len(pairs)} distinct pairs, mean top-1 weight "
          f"{weights[:, 0].mean():.2f}")
    assert (chosen > 0).all() and len(pairs) >= 10
    assert torch.allclose(weights.sum(-1), torch.ones(256)) and (weights[:, 0] - weights[:, 1]).abs().mean() > 0.05


def test_mixtral_export_gives_our_logits_and_greedy_tokens(mixtral_export):
    checkpoint, folder, record = mixtral_export
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    parity = compare_logits(checkpoint, folder, ids)
    print(f"Mixtral, 8 experts top-2: {parity}; verify: {record['parity']}")
    assert record["parity"]["max_abs_diff"] < FP32_TOLERANCE
    generated = assert_same_greedy(checkpoint, folder, [ids[0, :9].tolist(), ids[1, :4].tolist()], new_tokens=16)
    assert max(len(tokens) for tokens in generated) >= 10


def test_mixtral_config_and_tensors_map_exactly(mixtral_export):
    checkpoint, folder, record = mixtral_export
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert {k: config[k] for k in ("num_local_experts", "num_experts_per_tok", "intermediate_size",
                                   "sliding_window", "router_jitter_noise")} == {
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32, "sliding_window": None,
        "router_jitter_noise": 0.0}
    theirs, mine = safetensors_of(folder), model_tensors(ours(checkpoint))
    for i in (0, 1):
        for e in range(8):
            for part, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                name = f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                assert torch.equal(theirs[name], mine[f"layers.{i}.mlp.experts.{part}"][e].t()), name
        assert torch.equal(theirs[f"model.layers.{i}.block_sparse_moe.gate.weight"],
                           mine[f"layers.{i}.mlp.router.weight"])
    assert not [name for name in theirs if "bias" in name]
    assert len(theirs) == len(mine) - 2 * 4 + 2 * 3 * 8  # per MoE layer: 3 stacks and the bias -> 24 linears
    assert record["target"]["architecture"] == "MixtralForCausalLM"
    assert record["routing"]["model.moe.num_experts"] == "num_local_experts"


@torch.no_grad()
def test_swapping_w1_and_w3_breaks_the_logits(mixtral_export, tmp_path):
    """A wrong mapping of the experts' gate and up projections loads without complaint but moves the logits far
    beyond the tolerance (what the parity tests would catch)."""
    checkpoint, folder, _ = mixtral_export
    broken = Path(shutil.copytree(folder, tmp_path / "broken"))
    tensors = safetensors_of(broken)
    swapped = {name.replace(".w1.", ".w3.") if ".w1." in name else name.replace(".w3.", ".w1.") if ".w3." in name
               else name: tensor for name, tensor in tensors.items()}
    for file in broken.glob("*.safetensors"):
        file.unlink()
    save_file({k: v.contiguous() for k, v in swapped.items()}, broken / "model.safetensors", {"format": "pt"})
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    parity = logits_parity(ours(checkpoint)(ids), load_transformers_model(broken)(input_ids=ids).logits)
    print(f"w1/w3 swapped: {parity}")
    assert parity["max_abs_diff"] > 100 * FP32_TOLERANCE


def test_sliding_window_and_bf16_export_verified(tiny_data, tmp_path):
    """Our sliding window is Mixtral's (a position sees itself and the window - 1 before it); bf16 weights, the
    router's too (transformers computes Mixtral's router logits in the model's dtype), with tied embeddings and
    top-3 of 4 experts."""
    model = mixtral_model(sliding_window=16, tie_embeddings=True, moe={"num_experts": 4, "top_k": 3})
    checkpoint = save_softmax_checkpoint(tmp_path / "run", model, tiny_data / "tokenizer.json")
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(4))
    export_hf(checkpoint, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["sliding_window"] == 16
    print(f"Mixtral, sliding window 16 of 64, tied, top-3 of 4: {compare_logits(checkpoint, tmp_path / 'fp32', ids)}")
    assert_same_greedy(checkpoint, tmp_path / "fp32", [ids[0, :30].tolist()], new_tokens=20)
    record = export_hf(checkpoint, tmp_path / "bf16", dtype=torch.bfloat16, verify=True)
    print(f"Mixtral bf16 weights, verify: {record['parity']}")
    tensors = safetensors_of(tmp_path / "bf16")
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"].dtype == torch.bfloat16
    assert record["parity"]["max_abs_diff"] < FP32_TOLERANCE


REFUSED = {
    "shared": ({"moe": {"num_shared_experts": 1}}, "shared experts.*Qwen2-MoE's shared expert has a sigmoid gate"),
    "dense-first": ({"n_layers": 3, "moe": {"first_k_dense": 1}}, "dense first layers .model.moe.first_k_dense: 1"),
    "unnormalized": ({"moe": {"norm_topk": False}}, "unnormalized top-k weights"),
    "scaled": ({"moe": {"routed_scaling": 2.5}}, "routed scaling .model.moe.routed_scaling: 2.5"),
    "groups": ({"moe": {"n_groups": 4, "topk_groups": 2}}, "group-limited routing"),
    "capacity": ({"moe": {"capacity_factor": 1.25}}, "capacity_factor: 1.25 drops tokens"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_mixtral_cannot_compute_is_refused_by_name_and_leaves_no_output(name, tiny_data, tmp_path):
    changes, message = REFUSED[name]
    checkpoint = save_softmax_checkpoint(tmp_path / "run", mixtral_model(**changes), tiny_data / "tokenizer.json")
    with pytest.raises(ConversionError, match=f"softmax top-k MoE exports as MixtralForCausalLM only.*{message}"):
        export_hf(checkpoint, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")


def test_nonzero_selection_biases_and_mtp_modules_are_refused_and_leave_no_output(tiny_data, tmp_path):
    """save_moe_checkpoint's random selection biases change which experts are chosen: refused before anything is
    written; MTP modules are refused unless --mtp drop leaves them out."""
    biased = save_moe_checkpoint(tmp_path / "biased", mixtral_model(), tiny_data / "tokenizer.json")
    with pytest.raises(ConversionError, match=r"nonzero expert selection biases .*layers\.0\.mlp\.router\.expert_bias"
                                              ".*selects experts by the softmax scores alone"):
        export_hf(biased, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")
    checkpoint = save_softmax_checkpoint(tmp_path / "mtp", mixtral_model(mtp_depth=1), tiny_data / "tokenizer.json")
    with pytest.raises(ConversionError, match="multi-token prediction modules.*--mtp drop"):
        export_hf(checkpoint, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")
    record = export_hf(checkpoint, tmp_path / "hf", mtp="drop", verify=True)
    assert record["mtp"]["written"] == 0 and record["parity"]["max_abs_diff"] < FP32_TOLERANCE


def mixtral_folder(folder: Path, tokenizer: Path, **changes) -> Path:
    """A MixtralForCausalLM saved by transformers itself (its own checkpoint layout: block_sparse_moe, w1/w2/w3)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 6, "num_experts_per_tok": 2,
        "initializer_range": 0.2, "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "bos_token_id": 0,
        "eos_token_id": 1, "pad_token_id": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
        | changes)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def test_a_mixtral_folder_saved_by_transformers_imports_to_its_logits_and_exports_back_bit_identical(
        tiny_data, tmp_path):
    source = mixtral_folder(tmp_path / "source", tiny_data / "tokenizer.json", sliding_window=32)
    assert "model.layers.1.block_sparse_moe.experts.5.w3.weight" in safetensors_of(source)
    checkpoint = import_hf(source, tmp_path / "imported")
    model = ours(checkpoint)
    assert model.cfg.moe.score_func == "softmax" and model.cfg.sliding_window == 32
    ids = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(9))
    print(f"imported Mixtral (sliding window 32 of 100): {compare_logits(checkpoint, source, ids)}")
    export_hf(checkpoint, tmp_path / "back")
    theirs, back = safetensors_of(source), safetensors_of(tmp_path / "back")
    assert sorted(theirs) == sorted(back)
    assert all(torch.equal(theirs[name], back[name]) and theirs[name].dtype == back[name].dtype for name in theirs)


def test_our_mixtral_export_imports_and_exports_back_bit_identical(mixtral_export, tmp_path):
    checkpoint, folder, _ = mixtral_export
    imported = import_hf(folder, tmp_path / "imported")
    export_hf(imported, tmp_path / "again")
    first, again = safetensors_of(folder), safetensors_of(tmp_path / "again")
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads((folder / "config.json").read_text()) == json.loads((tmp_path / "again" / "config.json")
                                                                          .read_text())


def test_a_mixtral_folder_missing_an_expert_is_refused_on_import(tiny_data, tmp_path):
    source = mixtral_folder(tmp_path / "source", tiny_data / "tokenizer.json")
    tensors = {k: v for k, v in safetensors_of(source).items()
               if k != "model.layers.1.block_sparse_moe.experts.4.w2.weight"}
    (source / "model.safetensors").unlink()
    save_file(tensors, source / "model.safetensors", {"format": "pt"})
    with pytest.raises(ConversionError, match=r"layer 1 lacks the .*experts\.\{e\}\.w2\.weight of experts \[4\]"):
        import_hf(source, tmp_path / "imported")
    assert_no_output(tmp_path / "imported")
