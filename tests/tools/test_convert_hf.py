"""Hugging Face export and import (tools/convert_hf.py), checked through transformers itself, offline: an exported
checkpoint loads as LlamaForCausalLM with no missing, unexpected or reshaped weight and gives our logits on
validation text (fp32), our greedy tokens, our tokenizer's ids and chat template; so do odd shapes and scaled RoPE.
A folder saved by transformers imports to the same logits and exports back bit-identically; export -> import ->
export is bit-identical, and the import trains (--init-from) and generates. What cannot be converted is refused by
name and leaves no output."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import tools.convert_hf as convert_hf
from data.chat import ChatTemplate
from data.shards.manifest import Manifest
from data.shards.reader import read_shard_docs
from data.tokenizer import tokenizer_sha256, train_tokenizer
from pretrain.checkpoint import CheckpointManager, model_tensors, pieces, read_meta
from pretrain.cli import main
from pretrain.config import Config, DataConfig, config_to_yaml
from pretrain.decoding import generate_batch
from pretrain.evaluate import load_for_eval
from pretrain.generate_cli import tokenizer_file
from pretrain.model.config import MLAConfig, ModelConfig, RopeConfig
from pretrain.model.moe import MoEConfig
from pretrain.model.rope import rope_attention_factor, rope_frequencies
from tools.convert_hf import export_hf, import_hf
from tools.hf import ConversionError
from tools.hf.llama_config import check_rope_with_transformers, from_llama_config, to_llama_config
from tools.hf.parity import load_transformers_model, logits_parity

FP32_TOLERANCE = 1e-4


def val_docs(data_dir: Path) -> list[np.ndarray]:
    manifest = Manifest.load(data_dir)
    return [doc for info in manifest.splits["val"].shards
            for doc in read_shard_docs(data_dir / info.path, np.dtype(manifest.dtype), info)]


def save_checkpoint(folder: Path, model: ModelConfig, tokenizer: Path, state: dict | None = None) -> Path:
    """A checkpoint of `model` freshly initialized (seed 0), as a run would save it."""
    torch.manual_seed(0)
    cfg = Config(model=model, data=DataConfig(seq_len=min(64, model.rope.max_supported_seq_len(model.max_seq_len))))
    state = {"tokenizer": {"path": str(tokenizer), "sha256": tokenizer_sha256(tokenizer)}} | (state or {})
    return CheckpointManager(folder).save(7, pieces(model_tensors(model.build()), {}), state, config_to_yaml(cfg),
                                          layout={"world_size": 1}).wait()


def small_model(**changes) -> ModelConfig:
    """Tiny, with weights large enough (init_std 0.1) that logits and greedy choices are far from ties."""
    return ModelConfig(**{"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                          "max_seq_len": 64, "init_std": 0.1} | changes)


def ours(checkpoint: Path) -> torch.nn.Module:
    """Through `pretrain eval`'s loading path."""
    return load_for_eval(checkpoint).model.cpu()


@torch.no_grad()
def compare_logits(checkpoint: Path, folder: Path, ids: torch.Tensor) -> dict[str, float]:
    parity = logits_parity(ours(checkpoint)(ids), load_transformers_model(folder)(input_ids=ids).logits)
    assert parity["max_abs_diff"] < FP32_TOLERANCE, parity
    return parity


def assert_same_greedy(checkpoint: Path, folder: Path, prompts: list[list[int]], new_tokens: int = 20) -> list:
    """transformers' generate(do_sample=False) with the exported generation_config gives our greedy tokens (it
    returns the stop token it ends at, ours does not)."""
    stops = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
    expected = generate_batch(ours(checkpoint), prompts, new_tokens, stop_ids=stops)
    theirs = load_transformers_model(folder)
    for prompt, tokens in zip(prompts, expected, strict=True):
        ids = torch.tensor([prompt])
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False)[0, len(prompt):].tolist()
        assert out[: len(tokens)] == tokens and out[len(tokens):] in ([], [out[-1]]), (prompt, tokens, out)
        assert len(tokens) == new_tokens or out[-1] in stops
    return expected


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def exported(base_run, tmp_path_factory) -> tuple[Path, dict]:
    """The 4-step tiny run's checkpoint, exported (fp32, tied embeddings) and verified through transformers."""
    folder = tmp_path_factory.mktemp("export") / "hf"
    return folder, export_hf(base_run["checkpoint"], folder, verify=True)


@pytest.fixture(scope="module")
def small_tokenizer(tiny_data, tmp_path_factory) -> Path:
    """A 400-token BPE of the validation text, for models whose vocabulary is below the tiny data's 512."""
    ours_tokenizer = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    texts = [ours_tokenizer.decode(doc.tolist()) for doc in val_docs(tiny_data)]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(texts, 400).save(str(path))
    return path


def test_export_gives_our_logits_on_validation_text(base_run, tiny_data, exported):
    folder, record = exported
    windows = torch.from_numpy(np.concatenate(val_docs(tiny_data))[:128].astype(np.int64)).view(2, 64)
    parity = compare_logits(base_run["checkpoint"], folder, windows)
    print(f"validation text, 2 x 64 tokens: {parity}")
    assert record["parity"]["max_abs_diff"] < FP32_TOLERANCE and record["parity"]["kl"] < 1e-9
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "conversion.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert (config["vocab_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (512, 4, 2)
    assert "lm_head.weight" not in safetensors_of(folder)  # tied: transformers ties it to the embedding
    written = json.loads((folder / "conversion.json").read_text())
    assert written["name_mapping"]["layers.{i}.attn.q_proj.weight"] == "model.layers.{i}.self_attn.q_proj.weight"
    assert "lm_head.weight" not in written["name_mapping"] and written["vocab_size"] == 512
    assert "equal transformers" in written["rope"]["check"]


def test_a_weight_transformers_would_initialize_randomly_fails_the_parity_loading(exported, tmp_path):
    folder = Path(shutil.copytree(exported[0], tmp_path / "hf"))
    tensors = safetensors_of(folder)
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing_keys.*model.norm.weight"):
        load_transformers_model(folder)


def test_greedy_generation_gives_our_tokens(base_run, tiny_data, exported):
    docs = val_docs(tiny_data)
    generated = assert_same_greedy(base_run["checkpoint"], exported[0], [docs[0][:12].tolist(), docs[1][:5].tolist()])
    assert max(len(tokens) for tokens in generated) >= 10  # the comparison is not about an immediate stop


def test_exported_tokenizer_gives_our_ids_special_tokens_and_chat_template(tiny_data, exported):
    folder = exported[0]
    tokenizer = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    texts = [tokenizer.decode(doc.tolist()) for doc in val_docs(tiny_data)[:20]]
    texts += ["Hello <|eos|> world  \n\t with  spaces", "naïve café ✓ 東京"]
    template = ChatTemplate(tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the word apple mean?"},
            {"role": "assistant", "content": " A fruit."}, {"role": "user", "content": "And pear?"}]
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        theirs = loader.from_pretrained(folder)
        assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
            template.bos, tokenizer.token_to_id("<|eos|>"), tokenizer.token_to_id("<|pad|>"))
        for text in texts:
            ids = tokenizer.encode(text).ids
            assert theirs(text)["input_ids"] == ids, text
            assert theirs.decode(ids) == text
            assert theirs.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)  # ours skips them
        asked = theirs.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        assert asked == template.prompt(chat)
        assert theirs.apply_chat_template(chat[:3], return_dict=False) == template.render(chat[:3]).ids.tolist()
        with pytest.raises(Exception, match="role is system, user or assistant"):
            theirs.apply_chat_template([{"role": "tool", "content": "x"}])


def test_odd_shapes_export_with_equal_logits_and_tokens(small_tokenizer, tmp_path):
    """12 query heads over 4 KV heads (3 per group), head_dim 8, θ 5e5, untied embeddings, 509 tokens, FFN 200."""
    model = small_model(vocab_size=509, d_model=96, n_heads=12, n_kv_heads=4, ffn_hidden=200, norm_eps=1e-6,
                        rope=RopeConfig(theta=5e5), tie_embeddings=False)
    checkpoint = save_checkpoint(tmp_path / "run", model, small_tokenizer)
    folder = tmp_path / "hf"
    export_hf(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "intermediate_size", "tie_word_embeddings", "rms_norm_eps")} == {
        "vocab_size": 509, "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 8,
        "intermediate_size": 200, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
    assert config["rope_parameters"]["rope_theta"] == 5e5 and "lm_head.weight" in safetensors_of(folder)
    ids = torch.randint(0, 509, (2, 64), generator=torch.Generator().manual_seed(1))
    print(f"odd shapes: {compare_logits(checkpoint, folder, ids)}")
    assert_same_greedy(checkpoint, folder, [ids[0, :7].tolist(), ids[1, :3].tolist()])


SCALED = {  # original length 32 (64 for llama3, to reach all three of its wavelength bands), windows of 120
    "yarn": RopeConfig(scaling="yarn", factor=4, original_max_seq_len=32),
    "yarn-untruncated": RopeConfig(scaling="yarn", factor=4.5, original_max_seq_len=32, mscale=0.707,
                                   mscale_all_dim=1.0, beta_fast=4, beta_slow=1, truncate=False),
    "llama3": RopeConfig(scaling="llama3", factor=2, original_max_seq_len=64, theta=5e5),
    "linear": RopeConfig(scaling="linear", factor=4, original_max_seq_len=32),
    "dynamic": RopeConfig(scaling="dynamic", factor=4, original_max_seq_len=32),
    "ntk": RopeConfig(scaling="ntk", factor=4, original_max_seq_len=32),
}


@pytest.mark.parametrize("name", list(SCALED))
def test_scaled_rope_exports_with_equal_logits_beyond_the_original_length(name, tiny_data, tmp_path):
    rope = SCALED[name]
    checkpoint = save_checkpoint(tmp_path / "run", small_model(rope=rope, max_seq_len=32), tiny_data / "tokenizer.json")
    folder = tmp_path / "hf"
    record = export_hf(checkpoint, folder)
    assert record["rope"]["rope_parameters"]["rope_type"] == {"ntk": "default"}.get(rope.scaling, rope.scaling)
    ids = torch.randint(0, 512, (2, 120), generator=torch.Generator().manual_seed(2))
    print(f"{name}: {compare_logits(checkpoint, folder, ids)}")


def rope_cases():
    ropes = {"none": RopeConfig(theta=5e5), **SCALED,
             "yarn-attention-factor": RopeConfig(scaling="yarn", factor=8, original_max_seq_len=1024,
                                                 attention_factor=1.3),
             "llama3-8192": RopeConfig(scaling="llama3", factor=8, original_max_seq_len=8192, theta=5e5,
                                       low_freq_factor=2, high_freq_factor=6.5)}
    return [pytest.param(dim, rope, id=f"{name}-{dim}") for dim in (16, 64, 128) for name, rope in ropes.items()]


@pytest.mark.parametrize("dim,rope", rope_cases())
def test_rope_mapping_is_transformers_own_and_imports_back(dim, rope):
    model = small_model(d_model=4 * dim, rope=rope, max_seq_len=rope.original_max_seq_len or 64)
    config = to_llama_config(model, "float32", 0, 1, 2)
    assert "equal transformers" in check_rope_with_transformers(model, config)
    back = from_llama_config(config, "config.json").rope
    longer = 5 * model.rope.max_supported_seq_len(model.max_seq_len)
    for length in (None, longer):
        assert torch.equal(rope_frequencies(back, dim, length), rope_frequencies(rope, dim, length))
    assert rope_attention_factor(back) == rope_attention_factor(rope)
    if rope.scaling != "none":  # the check can fail: another factor (ntk: base) is another RoPE
        config["rope_parameters"]["rope_theta" if rope.scaling == "ntk" else "factor"] *= 1.5
        with pytest.raises(ConversionError, match="does not come out the same"):
            check_rope_with_transformers(model, config)


@pytest.mark.parametrize("dtype,shard,tied", [(torch.float32, None, True), (torch.bfloat16, "30KB", False)],
                         ids=["fp32-tied", "bf16-sharded-untied"])
def test_a_folder_saved_by_transformers_imports_to_its_logits_and_exports_back_bit_identical(
        dtype, shard, tied, tiny_data, tmp_path):
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                          "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    source = tmp_path / "source"
    LlamaForCausalLM(config).to(dtype).save_pretrained(source, **({"max_shard_size": shard} if shard else {}))
    assert (source / "model.safetensors.index.json").is_file() == bool(shard)
    shutil.copyfile(tiny_data / "tokenizer.json", source / "tokenizer.json")
    checkpoint = import_hf(source, tmp_path / "imported")
    ids = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(3))
    print(f"imported {dtype}: {compare_logits(checkpoint, source, ids)}")
    meta = read_meta(checkpoint)
    assert meta.tensors["model/embed.weight"].dtype == dtype  # stored as it came
    assert tokenizer_file(checkpoint, None) == checkpoint.resolve() / "tokenizer.json"
    assert meta.state["tokenizer"]["sha256"] == tokenizer_sha256(tiny_data / "tokenizer.json")
    export_hf(checkpoint, tmp_path / "back")
    assert_bit_identical(safetensors_of(source), safetensors_of(tmp_path / "back"))


def test_export_import_export_is_bit_identical_and_the_import_trains_and_generates(
        base_run, tiny_data, exported, tmp_path, capsys):
    from pretrain.callbacks import default_callbacks
    from pretrain.config import load_config
    from pretrain.trainer import Trainer
    from tests.pretrain.conftest import BASE_RUN, TINY_MODEL

    folder = exported[0]
    checkpoint = import_hf(folder, tmp_path / "imported")
    export_hf(checkpoint, tmp_path / "again")
    assert_bit_identical(safetensors_of(folder), safetensors_of(tmp_path / "again"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name

    run_dir = tmp_path / "phase"
    cfg = load_config(None, [*TINY_MODEL, f"data.dir={tiny_data}", *BASE_RUN, "train.steps=1",
                             f"train.init_from={checkpoint}"])
    summary = Trainer(cfg, run_dir, default_callbacks(cfg, run_dir)).fit()
    assert summary["initialized_from"]["path"] == str(checkpoint) and summary["steps"] == 1

    def generated(source: Path) -> list[int]:
        capsys.readouterr()
        assert main(["generate", str(source), "--prompt", "The", "--greedy", "--max-new-tokens", "8", "--json",
                     "--device", "cpu"]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"]

    assert generated(checkpoint) == generated(base_run["checkpoint"])


def test_cli_exports_bf16_shards_verified_and_imports(base_run, tmp_path, capsys):
    checkpoint, out = base_run["checkpoint"], tmp_path / "hf"
    assert main(["convert", "export-hf", str(checkpoint), str(out), "--dtype", "bf16", "--shard-size", "40KB",
                 "--verify"]) == 0
    assert "verified with transformers" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {t.dtype for t in safetensors_of(out).values()} == {torch.bfloat16}
    record = json.loads((out / "conversion.json").read_text())
    assert record["target"]["dtype"] == "bfloat16" and record["parity"]["max_abs_diff"] < FP32_TOLERANCE
    assert main(["convert", "import-hf", str(out), str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "meta.json").is_file()
    assert main(["convert", "export-hf", str(checkpoint), str(out)]) == 1
    assert "exists: choose a new folder" in capsys.readouterr().err
    assert main(["convert", "export-hf", str(checkpoint), str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert_no_output(tmp_path / "x")


MLA = MLAConfig(q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
REFUSED = {
    "moe": ({"moe": MoEConfig(num_experts=4, top_k=2, num_shared_experts=1)}, None,
            "MixtralForCausalLM only: cannot export shared experts"),  # softmax, shared: no architecture holds it
    "mtp": ({"mtp_depth": 1}, None, "multi-token prediction"),
    "mla": ({"attention": "mla", "mla": MLA}, None, "Multi-head Latent Attention"),
    "sliding-window": ({"sliding_window": 16}, None, "sliding-window attention"),
    "lora": ({}, {"lora_base": {"path": "/elsewhere/step_00000004", "step": 4}}, "run `pretrain checkpoint merge"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_llama_cannot_hold_is_refused_by_name_and_leaves_no_output(name, tiny_data, tmp_path):
    changes, state, message = REFUSED[name]
    checkpoint = save_checkpoint(tmp_path / "run", small_model(**changes), tiny_data / "tokenizer.json", state)
    with pytest.raises(ConversionError, match=message):
        export_hf(checkpoint, tmp_path / "hf")
    assert_no_output(tmp_path / "hf")


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory) -> Path:
    """A LlamaForCausalLM saved by transformers in several files and an index."""
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("transformers") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="100KB")
    return folder


def shard(folder: Path, index: int) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[index]


def truncate(folder: Path) -> None:
    shard(folder, 1).write_bytes(shard(folder, 1).read_bytes()[:-100])


def drop_tensor(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    file = folder / index["weight_map"].pop(name)
    with safe_open(file, "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(kept, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | changes))
    return edit


BROKEN = {
    "truncated": (truncate, r"model-00002-of-\d+.safetensors is truncated: '.*' ends at byte"),
    "garbled-header": (lambda f: shard(f, 0).write_bytes(b"\xff" * 64),
                       "not a safetensors file or is truncated"),
    "missing-tensor": (drop_tensor, r"missing \['model.layers.1.mlp.up_proj.weight'\]"),
    "reshaped": (edit_config(intermediate_size=128), r"reshaped \['model.layers.0.mlp.down_proj.weight \[64, 160\]"),
    "no-weights": (lambda f: [p.unlink() for p in f.glob("model*")], "holds neither model.safetensors"),
    "architecture": (edit_config(architectures=["MistralForCausalLM"], model_type="mistral"),
                     "describes MistralForCausalLM: only LlamaForCausalLM imports"),
    "attention-bias": (edit_config(attention_bias=True), "attention_bias: true"),
    "mlp-bias": (edit_config(mlp_bias=True), "mlp_bias: true"),
    "activation": (edit_config(hidden_act="gelu"), "hidden_act 'gelu'"),
    "rope-type": (edit_config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
                  "rope_type 'longrope' is not representable"),
    "partial-rope": (edit_config(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_or_unrepresentable_folder_is_a_clear_error_and_leaves_no_output(
        name, transformers_folder, tmp_path):
    damage, message = BROKEN[name]
    folder = Path(shutil.copytree(transformers_folder, tmp_path / "llama"))
    import_hf(folder, tmp_path / "intact")  # the undamaged copy imports
    damage(folder)
    with pytest.raises(ConversionError, match=message):
        import_hf(folder, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_a_failure_midway_or_an_existing_output_leaves_no_trace(exported, base_run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(convert_hf, "write_tokenizer_files", fail)  # after the weights are written
        with pytest.raises(OSError, match="disk full"):
            export_hf(base_run["checkpoint"], tmp_path / "hf")
    assert_no_output(tmp_path / "hf")

    save = CheckpointManager.save_streamed

    def save_then_fail(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointManager, "save_streamed", save_then_fail)
        with pytest.raises(OSError, match="disk full"):
            import_hf(exported[0], tmp_path / "imported")
    assert_no_output(tmp_path / "imported")

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for convert in (lambda: export_hf(base_run["checkpoint"], existing), lambda: import_hf(exported[0], existing)):
        with pytest.raises(ConversionError, match="exists: choose a new folder"):
            convert()
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
