"""Every config error is caught at load time, with a message naming the key."""

import json
from pathlib import Path

import pytest

from pretrain.config import ConfigError, config_to_yaml, load_config


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"vocab_size": 512}))
    return d


def load(data_dir, *overrides, path=None):
    return load_config(path, [f"data.dir={data_dir}", *overrides])


def expect_error(data_dir, key, *overrides, path=None, match=None):
    with pytest.raises(ConfigError) as info:
        load(data_dir, *overrides, path=path)
    assert info.value.key == key, str(info.value)
    assert key in str(info.value)
    if match:
        assert match in str(info.value)


def test_defaults_and_file_and_overrides(data_dir, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_model: 128\n  n_heads: 4\n  n_kv_heads: 2\ntrain:\n  steps: 7\n")
    cfg = load(data_dir, "train.steps=9", "optim.schedule=wsd", path=f)
    assert cfg.model.d_model == 128 and cfg.model.n_heads == 4
    assert cfg.train.steps == 9  # override wins over the file
    assert cfg.optim.schedule == "wsd"
    assert "d_model: 128" in config_to_yaml(cfg)


def test_resolved_yaml_round_trips(data_dir, tmp_path):
    cfg = load(data_dir, "model.n_layers=3")
    f = tmp_path / "resolved.yaml"
    f.write_text(config_to_yaml(cfg))
    assert load_config(f) == cfg


def test_unknown_key(data_dir):
    expect_error(data_dir, "model.hidden", "model.hidden=3", match="not in")


def test_unknown_key_in_file(data_dir, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 3\n")
    expect_error(data_dir, "train.stepz", path=f, match=str(f))


def test_unknown_section(data_dir):
    expect_error(data_dir, "modle", "modle.d_model=3")


def test_wrong_type(data_dir):
    expect_error(data_dir, "train.steps", "train.steps=many")


def test_hidden_not_divisible_by_heads(data_dir):
    expect_error(data_dir, "model.d_model", "model.d_model=100", "model.n_heads=8", match="not divisible")


def test_heads_not_divisible_by_kv_groups(data_dir):
    expect_error(data_dir, "model.n_kv_heads", "model.n_heads=8", "model.n_kv_heads=3", match="KV groups")


def test_seq_len_above_rope_support(data_dir):
    expect_error(data_dir, "data.seq_len", "model.max_seq_len=128", "data.seq_len=256", match="RoPE")


def test_batch_sizes_do_not_divide(data_dir):
    expect_error(
        data_dir, "train.global_batch_size", "train.micro_batch_size=3", "train.global_batch_size=8",
        match="not divisible",
    )


def test_missing_data_dir(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.dir={tmp_path / 'nowhere'}"])
    assert info.value.key == "data.dir" and "pretrain data prepare" in str(info.value)


def test_vocab_smaller_than_tokenizer(data_dir):
    expect_error(data_dir, "model.vocab_size", "model.vocab_size=256", match="512")


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.precision=fp8", "train.precision"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("train.steps=0", "train.steps"),
        ("model.rope.scaling=longrope", "model.rope.scaling"),
        ("model.rope.scaling=yarn", "model.rope.original_max_seq_len"),
        ("data.blend=[{dir: x, weight: -1}]", "data.blend[0].weight"),
    ],
)
def test_bad_values(data_dir, override, key):
    expect_error(data_dir, key, override)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


PIPELINE = ["model.n_layers=4", "train.micro_batch_size=2", "train.global_batch_size=8"]


@pytest.mark.parametrize(
    "overrides,key,match",
    [
        (["parallel.pp=8"], "parallel.pp", "only model.n_layers=4"),
        (["parallel.pp=2", "parallel.pp_schedule=zigzag"], "parallel.pp_schedule", "zigzag"),
        (["parallel.pp=2", "parallel.virtual_stages=2"], "parallel.virtual_stages", "interleaved_1f1b"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "parallel.virtual_stages", "at least 2"),
        (["model.n_layers=6", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
         "parallel.virtual_stages", "not divisible"),
        (["parallel.pp=2", "parallel.pp_layers=[1,2]"], "parallel.pp_layers", "summing to model.n_layers=4"),
        (["parallel.pp=2", "parallel.pp_layers=[0,4]"], "parallel.pp_layers", "positive"),
        (["parallel.pp_layers=[4]"], "parallel.pp_layers", "only with pipeline parallelism"),
        (["parallel.pp=4", "train.global_batch_size=6"], "train.global_batch_size", "cannot fill 4 pipeline stages"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2",
          "train.global_batch_size=6"], "train.global_batch_size", "multiple of pp=2"),
        (["parallel.pp=2", "train.global_batch_size=7"], "train.global_batch_size", "not divisible"),
    ],
)
def test_bad_pipeline_layouts(data_dir, overrides, key, match):
    expect_error(data_dir, key, *PIPELINE, *overrides, match=match)


def test_good_pipeline_layouts_load(data_dir):
    load(data_dir, *PIPELINE, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2")
    load(data_dir, *PIPELINE, "parallel.pp=2", "parallel.pp_layers=[3,1]")
    load(data_dir, *PIPELINE, "parallel.pp=4", "parallel.pp_schedule=gpipe")


DS = ["deepspeed.enabled=true"]


@pytest.mark.parametrize(
    "overrides,key,match",
    [
        ([*DS, "deepspeed.zero_stage=4"], "deepspeed.zero_stage", "must be 0, 1, 2 or 3"),
        ([*DS, "deepspeed.bucket_mb=0"], "deepspeed.bucket_mb", "positive"),
        ([*DS, "deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer",
         "zero_stage >= 1"),
        ([*DS, *PIPELINE, "parallel.pp=2", "deepspeed.zero_stage=2"], "deepspeed.zero_stage", "ZeRO-0 or ZeRO-1"),
        ([*DS, *PIPELINE, "parallel.pp=2", "deepspeed.zero_stage=3"], "deepspeed.zero_stage", "ZeRO-0 or ZeRO-1"),
        ([*DS, "deepspeed.config.gradient_clipping=0.5"], "deepspeed.config.gradient_clipping", "optim.grad_clip"),
        ([*DS, "deepspeed.config.train_batch_size=64"], "deepspeed.config.train_batch_size",
         "train.global_batch_size"),
        ([*DS, "deepspeed.config.zero_optimization.stage=2"], "deepspeed.config.zero_optimization.stage",
         "deepspeed.zero_stage"),
        (["deepspeed.enabled=maybe"], "deepspeed.enabled", "maybe"),
        ([*DS, "deepspeed.zero_stage=2", "train.on_nan=skip"], "train.on_nan", "skip needs the plain engine"),
        ([*DS, "deepspeed.zero_stage=3", "train.on_nan=rollback"], "train.on_nan", "rollback with DeepSpeed needs"),
        (["train.on_nan=retry"], "train.on_nan", "must be stop, skip or rollback"),
        (["train.max_rollbacks=-1"], "train.max_rollbacks", ">= 0"),
        ([*DS, "deepspeed.zero_stage=3", "train.compile=true"], "train.compile", "ZeRO-3 gathers"),
        ([*DS, "parallel.overlap_grad_reduce=true"], "parallel.overlap_grad_reduce", "overlap_comm"),
    ],
)
def test_bad_deepspeed_settings(data_dir, overrides, key, match):
    expect_error(data_dir, key, *overrides, match=match)


def test_deepspeed_json_is_generated_from_the_config(data_dir):
    from parallel.deepspeed_config import generate

    cfg = load(data_dir, *DS, "deepspeed.zero_stage=2", "parallel.dp=2", "train.micro_batch_size=2",
               "train.global_batch_size=16", "optim.grad_clip=0.5", "train.precision=bf16",
               "deepspeed.config.zero_optimization.round_robin_gradients=true", "deepspeed.config.dump_state=false")
    ds = generate(cfg)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 x dp 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["dump_state"] is False
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "managed_gradient_accumulation" not in ds
    piped = generate(load(data_dir, *DS, *PIPELINE, "parallel.pp=2", "deepspeed.zero_stage=1"))
    assert piped["managed_gradient_accumulation"] is False  # the schedule accumulates, DeepSpeed steps once
    no_clip = generate(load(data_dir, *DS, "optim.grad_clip=0"))
    assert no_clip["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default would clip at 1.0


MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]


@pytest.mark.parametrize(
    "overrides,key,match",
    [
        (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k", "between 1 and"),
        ([*MOE, "model.moe.score_func=relu"], "model.moe.score_func", "relu"),
        ([*MOE, "model.moe.n_groups=3"], "model.moe.n_groups", "do not split into 3 groups"),
        ([*MOE, "model.moe.n_groups=2", "model.moe.topk_groups=3"], "model.moe.topk_groups", "between 1 and"),
        (["model.moe.num_experts=4", "model.moe.top_k=3", "model.moe.n_groups=2"], "model.moe.top_k",
         "cannot be picked from 1 group(s) of 2"),
        ([*MOE, "model.moe.first_k_dense=9"], "model.moe.first_k_dense", "between 0 and"),
        ([*MOE, "model.moe.capacity_factor=-1"], "model.moe.capacity_factor", ">= 0"),
        ([*MOE, "model.moe.expert_hidden=33", "parallel.tp=2"], "model.moe.expert_hidden", "not divisible by"),
        (["model.mtp_depth=64", "data.seq_len=64", "model.max_seq_len=64"], "model.mtp_depth", "leaves no positions"),
        (["parallel.ep=2", "parallel.dp=2"], "parallel.ep", "needs an MoE model"),
        ([*MOE, "model.moe.num_experts=3", "model.moe.top_k=1", "parallel.ep=2", "parallel.dp=2"], "parallel.ep",
         "not divisible"),
        ([*MOE, "parallel.ep=2", "parallel.dp=1"], "parallel.ep", "must divide parallel.dp=1"),
        (["data.seq_len=36", "model.max_seq_len=64", "parallel.cp=2", "parallel.tp=4", "model.n_heads=4",
          "model.n_kv_heads=4", "parallel.sequence_parallel=true"], "data.seq_len",
         "36 tokens / parallel.cp=2 = 18 is not divisible by parallel.tp=4"),
        ([*MOE, "parallel.ep=2", "parallel.dp=2", *DS, "deepspeed.zero_stage=3"], "parallel.ep",
         "DeepSpeed needs deepspeed.zero_stage=1 or 2"),
        ([*MOE, "parallel.ep=2", "parallel.dp=2", *DS, "deepspeed.zero_stage=0"], "parallel.ep",
         "DeepSpeed needs deepspeed.zero_stage=1 or 2"),
    ],
)
def test_bad_moe_and_mtp_settings(data_dir, overrides, key, match):
    expect_error(data_dir, key, *overrides, match=match)


def test_expert_parallelism_with_zero_1_and_2_loads(data_dir):
    for stage in (1, 2):
        cfg = load(data_dir, *MOE, "parallel.ep=2", "parallel.dp=2", *DS, f"deepspeed.zero_stage={stage}")
        assert cfg.parallel.ep == 2 and cfg.deepspeed.zero_stage == stage


MLA = ["model.attention=mla", "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8",
       "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=8"]


@pytest.mark.parametrize(
    "overrides,key,match",
    [
        (["model.attention=mha"], "model.attention", "'mha' is not one of gqa, mla"),
        ([*MLA, "model.mla.qk_rope_head_dim=5"], "model.mla.qk_rope_head_dim", "must be even"),
        ([*MLA, "model.mla.kv_lora_rank=0"], "model.mla.kv_lora_rank", "positive"),
        ([*MLA, "model.mla.qk_nope_head_dim=-8"], "model.mla.qk_nope_head_dim", "positive"),
        ([*MLA, "model.mla.v_head_dim=0"], "model.mla.v_head_dim", "positive"),
        ([*MLA, "model.mla.q_lora_rank=-1"], "model.mla.q_lora_rank", ">= 0"),
    ],
)
def test_bad_attention_settings(data_dir, overrides, key, match):
    expect_error(data_dir, key, *overrides, match=match)


def test_mla_layouts_that_load(data_dir):
    cfg = load(data_dir, *MLA, "model.mla.q_lora_rank=0")
    assert cfg.model.attention == "mla" and cfg.model.rope_dim == 4 and cfg.model.mla.qk_head_dim == 12
    assert load(data_dir).model.rope_dim == load(data_dir).model.head_dim  # GQA (the default) rotates whole heads
    load(data_dir, *MLA, *PIPELINE, "parallel.pp=2")
    load(data_dir, *MLA, *MOE, "parallel.dp=2", "parallel.ep=2")


def test_deepseek_v3_config_loads(data_dir):
    cfg = load(data_dir, path=Path(__file__).resolve().parents[2] / "configs" / "deepseek_v3.yaml")
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len) == (129280, 7168, 61, 128, 4096)
    assert m.attention == "mla" and (m.mla.q_lora_rank, m.mla.kv_lora_rank) == (1536, 512)
    assert (m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim) == (128, 64, 128)
    e = m.moe
    assert (e.num_experts, e.top_k, e.expert_hidden, e.num_shared_experts, e.first_k_dense) == (256, 8, 2048, 1, 3)
    assert (e.score_func, e.n_groups, e.topk_groups, e.routed_scaling, e.norm_topk) == ("sigmoid", 8, 4, 2.5, True)
    assert (e.bias_update_rate, e.aux_loss_weight) == (0.001, 1e-4)
    assert m.ffn_dim == 18432 and m.mtp_depth == 1 and not m.tie_embeddings
    assert cfg.parallel.world_size == 2048 and cfg.train.global_batch_size * cfg.data.seq_len == 62_914_560
    assert (cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.ep, cfg.deepspeed.zero_stage) == (16, 128, 64, 1)


def test_a_phase_config_builds_on_its_base(tmp_path):
    long = load_config("configs/tiny_long.yaml", check_paths=False)
    tiny = load_config("configs/tiny.yaml", check_paths=False)
    assert long.model.d_model == tiny.model.d_model and long.model.n_layers == tiny.model.n_layers  # from the base
    assert (long.model.max_seq_len, long.data.seq_len, long.model.rope.scaling) == (1024, 1024, "yarn")
    assert long.model.rope.original_max_seq_len == tiny.data.seq_len
    assert load_config("configs/tiny_long.yaml", ["model.rope.factor=2"], check_paths=False).model.rope.factor == 2
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  steps: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="builds on itself"):
        load_config(tmp_path / "a.yaml", check_paths=False)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml", check_paths=False)


def test_the_passkey_experiment_extends_its_own_pretraining_4x():
    """configs/tiny_passkey_long.yaml builds on configs/tiny_passkey.yaml, which builds on tiny.yaml: the extension
    is 4x the length pretrained at, with the same tokens per step (README "Long context")."""
    base = load_config("configs/tiny_passkey.yaml", check_paths=False)
    long = load_config("configs/tiny_passkey_long.yaml", check_paths=False)
    tiny = load_config("configs/tiny.yaml", check_paths=False)
    assert (base.model.d_model, base.model.n_layers) == (tiny.model.d_model, tiny.model.n_layers)
    assert base.data.seq_len == base.model.max_seq_len == 128 and base.model.rope.scaling == "none"
    rope = long.model.rope
    assert rope.original_max_seq_len == base.data.seq_len and rope.factor * base.data.seq_len == long.data.seq_len
    assert long.train.global_batch_size * long.data.seq_len == base.train.global_batch_size * base.data.seq_len
    assert [b.dir for b in long.data.blend] == ["data_cache/tiny_long", "data_cache/passkey_512"]


def test_compile_without_a_cpu_compiler_is_a_config_error(data_dir, monkeypatch):
    import pretrain.compile

    monkeypatch.setattr(pretrain.compile.shutil, "which", lambda name: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    expect_error(data_dir, "train.compile", "train.compile=true", match="needs a C++ compiler")

