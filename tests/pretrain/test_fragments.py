"""ZeRO-style fragments in sharded checkpoints: a rank's contiguous range of a piece's elements is written as the
boxes it is made of (no whole tensor assembled anywhere) and read back at any other placement, whole or as other
fragments."""

import itertools
import json
import math
from pathlib import Path

import torch

from pretrain.checkpoint import MODEL, CheckpointManager, read_meta, read_pieces, verify
from pretrain.consolidate import full_tensors
from pretrain.sharded_io import Fragment, flat_range_boxes

FULL = torch.arange(70, dtype=torch.float32).view(10, 7)


def test_boxes_are_exactly_the_range_in_order():
    for shape in [(7,), (5, 7), (3, 4, 5), (2, 1, 3, 2)]:
        index = torch.arange(math.prod(shape)).view(shape)
        for start, stop in itertools.combinations(range(math.prod(shape) + 1), 2):
            boxes = flat_range_boxes(shape, start, stop)
            covered = torch.cat([index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].reshape(-1)
                                 for offsets, sizes in boxes])
            assert covered.tolist() == list(range(start, stop)), (shape, start, stop, boxes)
            assert len(boxes) <= 2 * len(shape) - 1
    assert flat_range_boxes((5, 7), 3, 3) == []


def split(numel: int, parts: int) -> list[tuple[int, int]]:
    """ZeRO's split of a piece's elements: equal ranges, the last one shorter."""
    size = math.ceil(numel / parts)
    return [(r * size, min(numel, (r + 1) * size)) for r in range(parts)]


def _save_as_fragments(rank: int, root: str) -> None:
    """TP=2 x DP=2: tensor-parallel rank t holds rows [5t, 5t + 5); its 35 elements are split 18 + 17 over DP."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=4)
    tp, dp = divmod(rank, 2)
    piece = FULL[5 * tp:5 * tp + 5]
    start, stop = split(piece.numel(), 2)[dp]
    where = Fragment(((10, 7), (5 * tp, 0)), (5, 7), start)
    CheckpointManager(Path(root) / "ckpt").save(
        1, {MODEL + "w": piece.reshape(-1)[start:stop].clone()}, {}, "", {MODEL + "w": where}).wait()
    dist.destroy_process_group()


def test_fragments_written_by_four_ranks_read_back_at_any_placement(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_save_as_fragments, args=(str(tmp_path),), nprocs=4)
    path = CheckpointManager(tmp_path / "ckpt").checkpoints()[-1]
    verify(path)
    meta = read_meta(path)
    assert len(meta.files) > 4  # a rank whose range starts or ends mid-row writes its boxes into several files
    assert torch.equal(full_tensors(path, MODEL)["w"], FULL)
    # rows of another tensor-parallel split, and fragments of another data-parallel split, read in one process
    rows = read_pieces(meta, {MODEL + "w": torch.empty(4, 7)}, {MODEL + "w": ((10, 7), (3, 0))})
    assert torch.equal(rows[MODEL + "w"], FULL[3:7])
    for tp, parts in [(0, 3), (1, 4)]:
        for start, stop in split(35, parts):
            where = Fragment(((10, 7), (5 * tp, 0)), (5, 7), start)
            got = read_pieces(meta, {MODEL + "w": torch.empty(stop - start)}, {MODEL + "w": where})[MODEL + "w"]
            assert torch.equal(got, FULL[5 * tp:5 * tp + 5].reshape(-1)[start:stop]), (tp, parts, start)
    whole_fragment = Fragment(((10, 7), (0, 0)), (10, 7), 11)  # a range across the two pieces' boundary
    got = read_pieces(meta, {MODEL + "w": torch.empty(40)}, {MODEL + "w": whole_fragment})[MODEL + "w"]
    assert torch.equal(got, FULL.reshape(-1)[11:51])
    assert json.loads((path / "meta.json").read_text())["step"] == 1
