"""Which layers each pipeline stage gets: balanced by cost, explicit, interleaved placement."""

import pytest

from parallel.pipeline.partition import balanced_layer_counts, plan_stages, stage_costs, stages_of_rank
from pretrain.model.config import ModelConfig


def test_equal_costs_split_evenly():
    assert balanced_layer_counts(8, 2, 1.0, 0.0, 0.0) == [4, 4]
    assert balanced_layer_counts(8, 4, 1.0, 0.0, 0.0) == [2, 2, 2, 2]
    assert balanced_layer_counts(3, 3, 1.0, 0.0, 0.0) == [1, 1, 1]


def test_expensive_head_moves_layers_off_the_last_stage():
    assert balanced_layer_counts(8, 2, 1.0, 0.0, 3.0) == [5, 3]
    assert balanced_layer_counts(8, 2, 1.0, 2.0, 0.0) == [3, 5]


def test_uneven_split_gives_the_earlier_stage_fewer_layers():
    assert balanced_layer_counts(7, 2, 1.0, 0.0, 0.0) == [3, 4]


def test_every_stage_gets_a_layer():
    assert balanced_layer_counts(4, 4, 1.0, 0.0, 100.0) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        balanced_layer_counts(2, 3, 1.0, 0.0, 0.0)


def test_costs_count_the_head_by_vocabulary():
    small = ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=256)
    big = ModelConfig(vocab_size=131072, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=256)
    assert stage_costs(big, 256)[2] > 10 * stage_costs(small, 256)[2]
    assert [len(r) for r in plan_stages(small, 256, 2, 1)] == [4, 4]
    assert [len(r) for r in plan_stages(big, 256, 2, 1)][1] < 4


def test_explicit_and_interleaved_plans():
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, max_seq_len=32)
    assert plan_stages(cfg, 32, 2, 1, [2, 6]) == [range(0, 2), range(2, 8)]
    assert plan_stages(cfg, 32, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # stage s lives on pipeline rank s % pp: rank 0 runs stages 0 and 2, rank 1 stages 1 and 3
    assert stages_of_rank(0, 2, 2) == [0, 2] and stages_of_rank(1, 2, 2) == [1, 3]


def test_moe_layers_cost_their_active_experts_and_dense_layers_their_mlp():
    """DeepSeek-style: dense first layers cost more than the MoE layers after them (a token uses 2 small experts),
    so the balanced split gives the first stage fewer layers than an even split would."""
    from pretrain.model.moe import MoEConfig

    cfg = ModelConfig(vocab_size=256, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=4096,
                      moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=64, first_k_dense=3))
    blocks, _, _ = stage_costs(cfg, 64)
    assert blocks[0] == blocks[2] > 2 * blocks[3] and blocks[3] == blocks[7]
    counts = balanced_layer_counts(8, 2, blocks, 0.0, 0.0)
    assert counts[0] < 4 and sum(counts) == 8
