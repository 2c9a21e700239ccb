"""The memory planner's numbers against simulation: each rank's real shard, built on the `meta` device and
parallelized under torch's fake process group of the full world size (DeepSeek-V3 at 2,048 ranks in DeepSeek's
layout, Llama-3-70B at TP=8 x PP=4 x DP=16, a small MoE+MTP model at TP=2 x PP=2 x EP=2 and with replicated KV
heads), holds exactly the parameters the planner counts, and the plain engine's AdamW creates exactly the optimizer
bytes it counts."""

import functools
import json

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from parallel.grid import GridShape, ProcessGrid
from parallel.memory_plan import GIB, parameters_per_pipeline_rank, plan, rank_memory, state_bytes
from parallel.plan import PipelineOptions, parallelize
from pretrain.config import load_config
from pretrain.optim import build_optimizer

SMALL_MOE = ["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.max_seq_len=64", "data.seq_len=64", "model.moe.expert_hidden=32", "train.micro_batch_size=2",
             "train.global_batch_size=8", "model.n_layers=4"]


def simulated_rank(cfg, rank: int, with_optimizer: bool = False) -> tuple[int, int, int]:
    """(dense parameter elements, expert parameter elements, AdamW state bytes) of global rank `rank`'s shard."""
    p = cfg.parallel
    shape = GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep)
    dist.init_process_group("fake", rank=rank, world_size=shape.world_size, store=FakeStore())
    try:
        grid = ProcessGrid.build(shape, shape.world_size, rank)
        with torch.device("meta"):
            model = cfg.model.build()
        pipeline = PipelineOptions(seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                                   n_microbatches=cfg.grad_accum_steps, virtual_stages=p.virtual_stages)
        plan_ = parallelize(model, grid, p.sequence_parallel, p.grad_bucket_mb, pipeline)
        named = dict(model.named_parameters())  # tied weights once
        expert = sum(t.numel() for n, t in named.items() if n in plan_.expert_names)
        dense = sum(t.numel() for n, t in named.items() if n not in plan_.expert_names)
        optimizer_bytes = 0
        if with_optimizer:
            optimizer = build_optimizer(model, cfg.optim)
            for param in named.values():
                param.grad = torch.empty_like(param)
            optimizer.step()  # creates AdamW's states (meta tensors: shapes and dtypes, no memory)
            optimizer_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                                  for key, v in state.items() if key != "step")
        return dense, expert, optimizer_bytes
    finally:
        dist.destroy_process_group()


def ranks_per_pipeline_stage(cfg) -> int:
    p = cfg.parallel
    return p.tp * p.cp * p.dp  # Megatron order: pipeline is the slowest-varying coordinate


@pytest.mark.parametrize("config,overrides,pp_ranks", [
    ("configs/deepseek_v3.yaml", [], [0, 1, 15]),
    ("configs/llama3_70b.yaml", [], [0, 1, 3]),
    ("configs/tiny_moe.yaml", [*SMALL_MOE, "parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2",
                               "parallel.sequence_parallel=true"], [0, 1]),
    ("configs/tiny_moe.yaml", [*SMALL_MOE, "parallel.tp=4", "parallel.pp=2", "parallel.virtual_stages=2",
                               "parallel.pp_schedule=interleaved_1f1b", "model.tie_embeddings=false"], [0, 1]),
], ids=["deepseek-v3 2048", "llama3-70b 512", "moe tp2 pp2 ep2", "moe tp4 (kv heads replicated) pp2 v2"])
def test_planner_parameters_equal_the_simulated_shards(config, overrides, pp_ranks):
    cfg = load_config(config, overrides, check_paths=False)
    planned = parameters_per_pipeline_rank(cfg)
    for pp_rank in pp_ranks:
        dense, expert, _ = simulated_rank(cfg, pp_rank * ranks_per_pipeline_stage(cfg))
        assert (planned[pp_rank].dense, planned[pp_rank].expert) == (dense, expert), f"pipeline rank {pp_rank}"


def test_planner_optimizer_bytes_equal_the_simulated_adamw_states():
    """The plain engine (our AdamW) on the meta shard of Llama-3-70B's first and last stage."""
    cfg = load_config("configs/llama3_70b.yaml", ["deepspeed.enabled=false", "optim.fused=false"],
                      check_paths=False)
    planned = parameters_per_pipeline_rank(cfg)
    for pp_rank in (0, 3):
        dense, expert, optimizer_bytes = simulated_rank(cfg, pp_rank * ranks_per_pipeline_stage(cfg), True)
        weights, grads, optimizer = state_bytes(cfg, planned[pp_rank])
        assert optimizer == optimizer_bytes and weights == grads == 4 * (dense + expert)


def test_zero_stages_partition_what_the_zero_paper_says():
    """ZeRO-0/1/2/3 in bf16 over DP=16: 2 + 2 + 12, 2 + 2 + 12/16, 2 + 14/16, 16/16 bytes per parameter (the 70B
    model at TP=8 without pipeline parallelism, which allows every stage)."""
    no_pp = ["parallel.pp=1"]
    params = parameters_per_pipeline_rank(load_config("configs/llama3_70b.yaml", no_pp, check_paths=False))[0]
    n = params.total
    for stage, expected in ((0, 16 * n), (1, (4 + 12 / 16) * n), (2, (2 + 14 / 16) * n), (3, 16 / 16 * n)):
        staged = load_config("configs/llama3_70b.yaml", [*no_pp, f"deepspeed.zero_stage={stage}"], check_paths=False)
        assert sum(state_bytes(staged, params)) == pytest.approx(expected, rel=1e-12), stage


def test_both_large_configs_fit_80gb_in_their_own_layout():
    """Both fit as configured; DeepSeek-V3 in DeepSeek's layout only with activation checkpointing (its 1F1B first
    stages hold 15-16 micro-batches of 4,096-token activations)."""
    llama = load_config("configs/llama3_70b.yaml", [], check_paths=False)
    memory, _ = rank_memory(llama)
    assert memory.total < 80 * GIB
    deepseek = load_config("configs/deepseek_v3.yaml", [], check_paths=False)
    assert deepseek.train.activation_checkpointing and rank_memory(deepseek)[0].total < 80 * GIB
    assert rank_memory(deepseek, recompute="none")[0].total > 80 * GIB


def test_plan_lists_fitting_layouts_first_and_says_why_others_do_not():
    cfg = load_config("configs/tiny_moe.yaml", SMALL_MOE, check_paths=False)
    limit = 2 * GIB + 53 * 2**20  # the 2 GiB reserve, and about half of these layouts of a tiny model
    rows = plan(cfg, gpus=8, gpu_memory=limit, gpus_per_node=4)
    fitting = [r for r in rows if r.fits]
    assert fitting and rows[: len(fitting)] == fitting
    assert all(r.memory.total <= limit for r in fitting)
    assert [r.step_seconds for r in fitting] == sorted(r.step_seconds for r in fitting)
    too_big = [r for r in rows if r.memory is not None and not r.fits]
    assert too_big and all("GiB on pipeline rank" in r.reason for r in too_big)
    invalid = [r for r in rows if r.memory is None]
    assert invalid and all(r.reason.startswith("invalid: config error at") for r in invalid)
    assert all(r.layout["tp"] <= 4 for r in rows)  # tensor parallelism stays inside a node


def test_plan_command(capsys):
    from pretrain.cli import main

    assert main(["plan", "configs/llama3_70b.yaml", "--gpus", "512", "--gpu-memory", "80GiB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "the config's own layout, fits" in out and "valid layouts fit" in out
    assert main(["plan", "configs/tiny_moe.yaml", "--gpus", "4", "--format", "json", *SMALL_MOE]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["gpus"] == 4 and any(r["fits"] for r in listed["layouts"])
    assert main(["plan", "configs/tiny.yaml", "--gpus", "2", "--gpu-memory", "lots"]) == 2


def saved_elements_per_token(block, x, cos, sin, model, tokens: int) -> float:
    """fp32 elements per token that autograd keeps for the backward of `block(x, cos, sin)` (saved-tensor hooks;
    weights and RoPE tables excluded, each storage counted once)."""
    not_activations = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in not_activations:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x, cos, sin)
    return sum(saved.values()) / 4 / tokens


MLA_SMALL = ["model.attention=mla", "model.mla.q_lora_rank=64", "model.mla.kv_lora_rank=32",
             "model.mla.qk_rope_head_dim=16", "model.mla.qk_nope_head_dim=32", "model.mla.v_head_dim=32"]


def _tiny_moe_block_inputs(overrides: list[str]):
    """(config, model, block input x [4, 128, d] requiring grad, cos, sin) of the tiny MoE model."""
    cfg = load_config("configs/tiny_moe.yaml", overrides, check_paths=False)
    torch.manual_seed(0)
    model = cfg.model.build()
    batch, seq = 4, 128
    x = torch.randn(batch, seq, cfg.model.d_model, requires_grad=True)
    cos, sin = model.rope(seq)
    return cfg, model, x, cos, sin


@pytest.mark.parametrize("overrides,layer", [([], 0), ([], 1), (MLA_SMALL, 1)], ids=["gqa dense", "gqa moe", "mla moe"])
def test_block_activations_equal_what_autograd_saves(overrides, layer):
    """The planner's activations per token of a block equal the bytes autograd keeps for its backward (saved-tensor
    hooks, weights and RoPE tables excluded), less MLA's score matrix, which only the CPU's math kernel keeps."""
    from parallel.memory_plan import block_activation_elements

    cfg, model, x, cos, sin = _tiny_moe_block_inputs(overrides)
    batch, seq = x.shape[:2]
    per_token = saved_elements_per_token(model.layers[layer], x, cos, sin, model, batch * seq)
    if cfg.model.attention == "mla":
        per_token -= cfg.model.n_heads * (seq - 1)  # the math kernel's probabilities instead of a log-sum-exp
    assert per_token == pytest.approx(block_activation_elements(cfg.model, layer, 1, False), abs=16)


def selectively_saved_elements_per_token(block, x, cos, sin, tokens: int) -> float:
    """fp32 elements per token that selective recomputation keeps for the backward of `block(x, cos, sin)`: the
    outputs the selective policy saves (each storage once) and the block's input, which `checkpoint` keeps."""
    from torch.utils.checkpoint import checkpoint

    from pretrain.model import recompute

    saved = {}

    def keep(out: torch.Tensor) -> None:
        saved[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()

    contexts = functools.partial(recompute.recompute_contexts, block, "selective")
    with recompute.observing_selective_saves(keep):
        checkpoint(block, x, cos, sin, use_reentrant=False, context_fn=contexts)
    assert saved, "the selective policy saved nothing"
    return (sum(saved.values()) + x.untyped_storage().nbytes()) / 4 / tokens


@pytest.mark.parametrize("layer", [0, 1], ids=["gqa dense", "gqa moe"])
def test_selective_recomputation_keeps_what_the_planner_counts(layer):
    """Selective recomputation keeps the outputs of the matmuls and of the fused attention kernel and the input:
    the planner's count per token; well under what the block keeps without recomputation."""
    from parallel.memory_plan import block_activation_elements, block_selective_elements

    cfg, model, x, cos, sin = _tiny_moe_block_inputs([])
    batch, seq = x.shape[:2]
    per_token = selectively_saved_elements_per_token(model.layers[layer], x, cos, sin, batch * seq)
    assert per_token == pytest.approx(block_selective_elements(cfg.model, layer, 1, False), abs=1)
    assert per_token < 0.8 * block_activation_elements(cfg.model, layer, 1, False)


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["tp2 sp", "tp2"])
def test_tensor_parallel_block_activations_equal_what_autograd_saves(sequence_parallel):
    """On one rank of TP=2 (fake process group: collectives leave their outputs unfilled, which autograd's
    bookkeeping does not look at), a dense block keeps what the planner counts: heads and hidden size halved, the
    norms' inputs halved with SP, and one gathered input shared by q/k/v and by gate/up (not a copy each)."""
    from parallel.memory_plan import block_activation_elements, block_selective_elements

    cfg = load_config("configs/tiny.yaml", ["model.n_layers=1", "parallel.tp=2",
                                            f"parallel.sequence_parallel={str(sequence_parallel).lower()}"],
                      check_paths=False)
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        grid = ProcessGrid.build(GridShape(tp=2), 2, 0)
        torch.manual_seed(0)
        model = cfg.model.build()
        parallelize(model, grid, sequence_parallel, 25, PipelineOptions(seq_len=64, micro_batch_size=2))
        batch, seq = 2, 64
        x = torch.randn(batch, seq // 2 if sequence_parallel else seq, cfg.model.d_model, requires_grad=True)
        cos, sin = model.rope(seq)
        per_token = saved_elements_per_token(model.layers[0], x, cos, sin, model, batch * seq)
        selective = selectively_saved_elements_per_token(model.layers[0], x, cos, sin, batch * seq)
    finally:
        dist.destroy_process_group()
    assert per_token == pytest.approx(block_activation_elements(cfg.model, 0, 2, sequence_parallel), abs=1)
    assert selective == pytest.approx(block_selective_elements(cfg.model, 0, 2, sequence_parallel), abs=1)


def test_context_parallel_block_activations_equal_what_autograd_saves():
    """On one rank of CP=2 (fake process group), a GQA block keeps for its half of each window what the planner
    counts per local token: the whole window's (gathered) keys and values, its own queries, the query chunks'
    outputs and their concatenation. Less the causal masks that torch's CPU kernel materializes for each query chunk
    (a GPU kernel keeps none). (MLA runs on the CPU's math kernel, whose per-chunk copies a GPU does not make.)"""
    from parallel.memory_plan import block_activation_elements

    cfg = load_config("configs/tiny_moe.yaml", ["parallel.cp=2", "data.seq_len=128", "model.max_seq_len=128"],
                      check_paths=False)
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        grid = ProcessGrid.build(GridShape(cp=2), 2, 1)
        torch.manual_seed(0)
        model = cfg.model.build()
        parallelize(model, grid)
        batch, seq = 4, 128
        local = seq // 2
        x = torch.randn(batch, local, cfg.model.d_model, requires_grad=True)
        cos, sin, chunks = model.attention_inputs(local)
        per_token = saved_elements_per_token(lambda *a: model.layers[1](*a, None, chunks), x, cos, sin, model,
                                             batch * local)
    finally:
        dist.destroy_process_group()
    per_token -= (local // 2) * sum(chunks.ends) / (batch * local)  # the CPU kernel's [chunk, end] float masks
    assert per_token == pytest.approx(block_activation_elements(cfg.model, 1, 1, False, cp=2), abs=16)
    # the gathered keys and values are most of what CP adds: 2 x (cp - 1) x heads x head_dim per local token
    heads_dims = cfg.model.n_heads * cfg.model.head_dim
    assert block_activation_elements(cfg.model, 1, 1, False, cp=2) - block_activation_elements(
        cfg.model, 1, 1, False) == 3 * heads_dims
