"""Rank layout of the process grid, checked against Megatron's documented example."""

import itertools

import pytest

from parallel.grid import GridError, GridShape, coordinates, layout


def test_megatron_example_tp2_pp4_dp2():
    # Megatron-LM's parallel_state docstring: 16 GPUs, TP=2, PP=4 → DP=2.
    groups = layout(GridShape(tp=2, pp=4, dp=2))
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert sorted(groups["dp"]) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert sorted(groups["pp"]) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


@pytest.mark.parametrize("tp,cp,dp,pp,ep", [(2, 1, 2, 2, 2), (1, 2, 4, 1, 2), (2, 1, 4, 1, 4), (1, 1, 1, 1, 1)])
def test_every_kind_partitions_the_world_and_coordinates_agree(tp, cp, dp, pp, ep):
    shape = GridShape(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep)
    groups = layout(shape)
    world = list(range(shape.world_size))
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "ep": ep, "expert_dp": dp // ep, "dp_cp": dp * cp,
             "expert_dp_cp": dp // ep * cp, "model": tp * pp}
    for kind, members in groups.items():
        assert sorted(itertools.chain(*members)) == world, kind
        if kind != "embedding":
            assert all(len(g) == sizes[kind] for g in members), kind
    for pipeline in groups["pp"]:
        assert sorted({pipeline[0], pipeline[-1]}) in groups["embedding"]
    for rank in world:
        c = coordinates(shape, rank)
        assert rank == c["tp"] + tp * (c["cp"] + cp * (c["dp"] + dp * c["pp"]))
        (tp_group,) = [g for g in groups["tp"] if rank in g]
        assert tp_group.index(rank) == c["tp"]
        (dp_group,) = [g for g in groups["dp"] if rank in g]
        assert dp_group.index(rank) == c["dp"]
        (ep_group,) = [g for g in groups["ep"] if rank in g]
        assert ep_group.index(rank) == c["ep"] and set(ep_group) <= set(dp_group)
        # the ranks holding this rank's experts, over data and context: the same (pp, tp) and expert index
        (expert_dp_cp,) = [g for g in groups["expert_dp_cp"] if rank in g]
        assert all(coordinates(shape, r)["ep"] == c["ep"] and coordinates(shape, r)["tp"] == c["tp"]
                   and coordinates(shape, r)["pp"] == c["pp"] for r in expert_dp_cp)


def test_sizes_must_multiply_to_world():
    with pytest.raises(GridError, match="world size 8"):
        GridShape(tp=2, dp=3).check(8)


def test_ep_must_divide_dp():
    with pytest.raises(GridError, match="parallel.ep=3"):
        GridShape(dp=4, ep=3).check(4)


def test_a_rank_creates_only_its_own_groups_at_2048_ranks(monkeypatch):
    """DeepSeek-V3's layout (16 pipeline stages, EP=64 over 128 data-parallel ranks) at 2,048 ranks, built under
    torch's fake process group: each rank creates one group per distinct group it belongs to (kinds with the same
    members share one), never the other ranks' — the whole layout has thousands of groups."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.grid import ProcessGrid

    shape = GridShape(pp=16, dp=128, ep=64)
    total = sum(len(groups) for groups in layout(shape).values())
    created: list[list[int]] = []
    real_new_group = dist.new_group

    def counting_new_group(ranks, **kwargs):
        created.append(list(ranks))
        return real_new_group(ranks, **kwargs)

    monkeypatch.setattr(dist, "new_group", counting_new_group)
    for rank in (0, 777, 2047):
        created.clear()
        dist.init_process_group("fake", rank=rank, world_size=shape.world_size, store=FakeStore())
        try:
            grid = ProcessGrid.build(shape, shape.world_size, rank)
        finally:
            dist.destroy_process_group()
        assert all(rank in members for members in created)
        assert len(created) == len({tuple(m) for m in grid.group_ranks.values()}) <= len(grid.group_ranks)
        assert grid.size("pp") == 16 and grid.size("ep") == 64 and grid.size("expert_dp") == 2
        assert grid.size("dp") == 128 and grid.size("tp") == 1
        print(f"rank {rank}: {len(created)} groups created of {total} in the layout")
    assert total > 5000
