"""Sharded initialization: a model built on `meta`, parallelized, then materialized shard by shard holds exactly
what the whole model, initialized on one process and then cut by the same plan, holds — on every rank of a
TP=2 x PP=2 x EP=2 (DP=2) layout of the MoE + MTP model, simulated in one process with torch's fake process group
(sharded initialization needs no communication)."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from parallel.grid import GridShape, ProcessGrid
from parallel.materialize import materialize
from parallel.plan import PipelineOptions, parallelize
from pretrain.config import load_config

SEED = 1234
LAYOUT = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]
SMALL = ["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
         "data.seq_len=64", "model.moe.expert_hidden=32", "train.micro_batch_size=2", "train.global_batch_size=8"]


def rank_state(cfg, rank: int, sharded: bool, placements: dict | None = None) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers after building the model the sharded way or the whole way (and, into
    `placements`, where each lies in the full tensor according to the plan)."""
    p = cfg.parallel
    shape = GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep)
    dist.init_process_group("fake", rank=rank, world_size=shape.world_size, store=FakeStore())
    try:
        grid = ProcessGrid.build(shape, shape.world_size, rank)
        pipeline = PipelineOptions(seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                                   n_microbatches=cfg.grad_accum_steps)
        torch.manual_seed(SEED)
        if sharded:
            with torch.device("meta"):
                model = cfg.model.build()
            rules = model.init_rules()
            plan = parallelize(model, grid, p.sequence_parallel, p.grad_bucket_mb, pipeline)
            materialize(model, plan, rules, SEED, torch.device("cpu"))
        else:
            model = cfg.model.build()  # the whole model, initialized on this process, then cut
            parallelize(model, grid, p.sequence_parallel, p.grad_bucket_mb, pipeline)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        if placements is not None:
            placements.update({name: plan.placement(name, t.shape) for name, t in tensors.items()})
        return {name: t.detach().clone() for name, t in tensors.items()}
    finally:
        dist.destroy_process_group()


MLA = ["model.attention=mla", "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=16", "model.mla.qk_rope_head_dim=8",
       "model.mla.qk_nope_head_dim=8", "model.mla.v_head_dim=16"]


@pytest.mark.parametrize("extra", [[], MLA, [*MLA, "model.tie_embeddings=false"]], ids=["gqa", "mla", "mla untied"])
def test_every_rank_materializes_the_slices_of_the_whole_model(extra):
    cfg = load_config("configs/tiny_moe.yaml", [*SMALL, *LAYOUT, *extra], check_paths=False)
    with torch.device("meta"):
        full = cfg.model.build()
    full_names = {n for n, _ in full.named_parameters()} | {n for n, _ in full.named_buffers()}
    param_names = {n for n, _ in full.named_parameters()}
    full_elements = sum(p.numel() for p in full.parameters())
    held = set()
    for rank in range(cfg.parallel.world_size):
        sharded, whole = rank_state(cfg, rank, sharded=True), rank_state(cfg, rank, sharded=False)
        assert sharded.keys() == whole.keys()
        for name, tensor in whole.items():
            assert sharded[name].shape == tensor.shape, name
            assert torch.equal(sharded[name], tensor), f"rank {rank}: {name} differs"
        held |= sharded.keys()
        held_elements = sum(t.numel() for name, t in sharded.items() if name in param_names)
        assert held_elements < full_elements / 2  # shards, not the whole model
    # between them the ranks hold every parameter and buffer (RoPE table, expert biases, MoE counters, norms)
    assert full_names <= held


def test_init_depends_on_names_not_on_construction_order():
    """The same parameter gets the same initial value in models of different depth (values come from the seed
    and the name alone), and different parameters get different values."""
    torch.manual_seed(SEED)
    small = load_config(None, [*SMALL, "model.n_layers=2"], check_paths=False).model.build()
    torch.manual_seed(SEED)
    deep = load_config(None, [*SMALL, "model.n_layers=3"], check_paths=False).model.build()
    assert torch.equal(small.embed.weight, deep.embed.weight)
    assert torch.equal(small.layers[1].attn.q_proj.weight, deep.layers[1].attn.q_proj.weight)
    assert not torch.equal(small.layers[0].attn.q_proj.weight, small.layers[1].attn.q_proj.weight)


@pytest.mark.parametrize("layout", [LAYOUT, ["parallel.tp=4", "parallel.ep=2", "parallel.dp=2"]],
                         ids=["tp2 pp2 ep2 dp2", "tp4 (replicated kv heads) ep2 dp2"])
def test_placements_locate_every_shard_in_the_full_tensor(layout):
    """What sharded checkpoints record with each piece: its offsets in the full tensor. Each rank's shard is the
    slice of the one-process model its placement names, and the ranks' distinct pieces tile every tensor."""
    cfg = load_config("configs/tiny_moe.yaml", [*SMALL, *layout], check_paths=False)
    torch.manual_seed(SEED)
    full = cfg.model.build()
    whole = dict(full.named_parameters()) | dict(full.named_buffers())
    pieces: dict[str, set] = {}
    for rank in range(cfg.parallel.world_size):
        placements: dict = {}
        shards = rank_state(cfg, rank, sharded=True, placements=placements)
        for name, shard in shards.items():
            shape, offsets = placements[name]
            assert shape == tuple(whole[name].shape), name
            region = tuple(slice(o, o + n) for o, n in zip(offsets, shard.shape, strict=True))
            assert torch.equal(whole[name][region], shard), f"rank {rank}: {name} at {offsets}"
            pieces.setdefault(name, set()).add((offsets, tuple(shard.shape)))
    for name, tensor in whole.items():
        covered = sum(torch.Size(size).numel() for _, size in pieces[name])
        assert covered == tensor.numel(), name  # no gaps, no overlaps between distinct pieces


def zero3_rank_state(cfg, rank: int, during: list[int], dp_ranks: dict[int, int]) -> dict[str, torch.Tensor]:
    """This rank's ZeRO-3 partition of every parameter (padding included) after the sharded build, with each unit
    handed to DeepSpeed's zero.Init as it is filled; `during` gets, at each hand-over, how many elements of whole
    (unpartitioned, materialized) parameters the rank holds."""
    from parallel.deepspeed_engine import ZeroInitPartitioner

    p = cfg.parallel
    shape = GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep)
    dist.init_process_group("fake", rank=rank, world_size=shape.world_size, store=FakeStore())
    try:
        grid = ProcessGrid.build(shape, shape.world_size, rank)
        dp_ranks[rank] = grid.coords["dp"]
        pipeline = PipelineOptions(seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                                   n_microbatches=cfg.grad_accum_steps)
        with torch.device("meta"):
            model = cfg.model.build()
        rules = model.init_rules()
        plan = parallelize(model, grid, p.sequence_parallel, p.grad_bucket_mb, pipeline)
        partitioner = ZeroInitPartitioner(plan, cfg)

        def partition(params):
            during.append(sum(t.numel() for t in model.parameters() if not hasattr(t, "ds_id") and not t.is_meta))
            partitioner(params)

        materialize(model, plan, rules, SEED, torch.device("cpu"), partition)
        assert all(hasattr(t, "ds_id") and t.numel() == 0 for t in model.parameters())  # no whole weight is left
        return {name: t.ds_tensor.detach().clone() for name, t in model.named_parameters()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.tp=2", "parallel.dp=2"]], ids=["dp2", "tp2 x dp2"])
def test_zero3_ranks_hold_their_partitions_of_the_initial_model_never_the_whole(layout):
    """Under ZeRO-3 each unit (a block, the embedding, ...) is partitioned by DeepSpeed's zero.Init as soon as it is
    filled: a rank ends with its partition of each weight, equal to that range of the one-process initial value
    cut by the tensor-parallel plan, and never holds more than one unit's whole weights."""
    overrides = [*(o for o in SMALL if not o.startswith("model.moe")), *layout, "deepspeed.enabled=true",
                 "deepspeed.zero_stage=3"]
    cfg = load_config("configs/tiny.yaml", overrides, check_paths=False)
    with torch.device("meta"):
        full = cfg.model.build()
    largest_unit = max(sum(t.numel() for t in block.parameters()) for block in [*full.layers, full.embed])
    whole_model = sum(t.numel() for t in full.parameters())
    ranks = {}  # rank -> its data-parallel rank
    for rank in range(cfg.parallel.world_size):
        during = []
        partitions = zero3_rank_state(cfg, rank, during, ranks)
        whole = rank_state(cfg, rank, sharded=False)  # the one-process model cut by the tensor-parallel plan
        dp_rank, dp = ranks[rank], cfg.parallel.dp
        for name, partition in partitions.items():
            flat = whole[name].flatten()
            size = partition.numel()
            assert size == -(-flat.numel() // dp), name
            expected = torch.zeros(size)
            held = flat[dp_rank * size:(dp_rank + 1) * size]
            expected[:held.numel()] = held
            assert torch.equal(partition, expected), f"rank {rank}: {name} differs"
        assert during and max(during) <= largest_unit < whole_model / 4
