"""Which ranks read the data: one per tensor-parallel group, and no middle pipeline stage. That the others still
train on the reader's batches is what the TP and PP equivalence tests prove (they would diverge on zeros)."""

from types import SimpleNamespace

from parallel.data_feed import DataFeed
from parallel.grid import GridShape, ProcessGrid, coordinates, own_groups


def grid(shape: GridShape, rank: int) -> ProcessGrid:
    return ProcessGrid(shape=shape, rank=rank, coords=coordinates(shape, rank), group_ranks=own_groups(shape, rank))


def stages(pp_rank: int, pp: int, virtual: int = 1) -> SimpleNamespace:
    ids = [pp_rank + v * pp for v in range(virtual)]
    return SimpleNamespace(has_first_stage=0 in ids, has_last_stage=pp * virtual - 1 in ids)


def test_one_reader_per_tensor_parallel_group_and_none_in_middle_stages():
    shape = GridShape(tp=4, pp=4, dp=2)
    feeds = {r: DataFeed.for_rank(grid(shape, r), stages(coordinates(shape, r)["pp"], 4))
             for r in range(shape.world_size)}
    for rank, feed in feeds.items():
        c = coordinates(shape, rank)
        assert feed.needed == (c["pp"] in (0, 3))
        assert feed.reads == (feed.needed and c["tp"] == 0)
    assert sum(f.reads for f in feeds.values()) == 2 * 2  # first and last stage, per data-parallel rank
    # interleaved stages: every rank holds a chunk of the first or last stage
    assert all(DataFeed.for_rank(grid(shape, r), stages(coordinates(shape, r)["pp"], 4, virtual=2)).needed
               is (coordinates(shape, r)["pp"] in (0, 3)) for r in range(shape.world_size))


def test_without_tensor_parallelism_every_needed_rank_reads_and_shares_nothing():
    shape = GridShape(dp=4)
    for rank in range(4):
        feed = DataFeed.for_rank(grid(shape, rank))
        assert feed.reads and feed.needed and feed.peers is None
