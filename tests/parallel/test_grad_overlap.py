"""`parallel.overlap_grad_reduce`: the data-parallel gradient average started during the backward gives the same
gradients as the one after it. Unit level (two gloo ranks, two micro-batches, a parameter only one rank uses): the
averages equal the mean of the ranks' gradients exactly (with bf16 sums: the bf16 sum of bf16 halves), buckets start
before the backward ends, and a third backward in the step is refused. Through `pretrain train`, with 2 micro-batches
per rank and step: TP=2+SP x DP=2 (the tensor-parallel sums come after the overlapped average), PP=2 x DP=2 and
MoE+MTP at DP=2 equal one process, with the tolerances of test_zero.py."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.parallel.cli_runs import (
    assert_curve_matches,
    assert_final_checkpoint_matches,
)
from tests.parallel.test_moe_parallel import MOE, MTP

OVERLAP = ["parallel.overlap_grad_reduce=true"]


def _backward_passes(rank: int, averager_for=None) -> tuple[list[torch.Tensor], list[int], object]:
    """Two micro-batches through three layers, the third used by rank 1 only; (parameters, buckets started after
    each micro-batch's backward, the averager)."""
    torch.manual_seed(0)
    first, last, only_rank1 = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(8, 4)
    params = [*first.parameters(), *last.parameters(), *only_rank1.parameters()]
    averager = averager_for(params) if averager_for else None
    started = []
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x = torch.randn(5, 8, generator=generator)
        out = last(torch.relu(first(x)))
        if rank == 1:
            out = out + only_rank1(x)
        out.square().sum().backward()
        started.append(averager.started if averager else 0)
    return params, started, averager


def _overlap_worker(rank: int, root: str) -> None:
    import torch.distributed as dist

    from parallel.data_parallel import OverlappedGradientAverager

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    plain, _, _ = _backward_passes(rank)
    expected = []
    for p in plain:
        local = p.grad if p.grad is not None else torch.zeros_like(p)
        pair = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(pair, local)
        expected.append(pair[0] / 2 + pair[1] / 2)
    params, started, averager = _backward_passes(
        rank, lambda params: OverlappedGradientAverager([(params, None, 2)], microbatches=2, bucket_bytes=64))
    averager.finish()
    halves, _, in_bf16 = _backward_passes(rank, lambda params: OverlappedGradientAverager(
        [(params, None, 2)], microbatches=2, bucket_bytes=64, reduce_dtype=torch.bfloat16))
    in_bf16.finish()
    bf16_sums = []  # each rank's half rounded to bf16, the sum rounded to bf16
    for p in plain:
        local = (p.grad if p.grad is not None else torch.zeros_like(p)).div(2).bfloat16()
        pair = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(pair, local)
        bf16_sums.append((pair[0] + pair[1]).float())
    refused = ""
    layer = nn.Linear(2, 2)  # a third backward in a step of two micro-batches
    once_too_often = OverlappedGradientAverager([(list(layer.parameters()), None, 2)], microbatches=2)
    try:
        for _ in range(3):
            layer(torch.ones(1, 2)).sum().backward()
    except RuntimeError as exc:
        refused = str(exc)
    once_too_often.finish()
    Path(root, f"rank{rank}.json").write_text(json.dumps({
        "equal": [torch.equal(p.grad, want) for p, want in zip(params, expected, strict=True)],
        "bf16_equal": [torch.equal(p.grad, want) for p, want in zip(halves, bf16_sums, strict=True)],
        "bf16_differs": any(not torch.equal(a, b) for a, b in zip(bf16_sums, expected, strict=True)),
        "started": started, "buckets": len(averager.buckets), "refused": refused,
        "reset": averager.started == 0 and all(c == 0 for c in averager.counts.values())}))
    dist.destroy_process_group()


def test_the_overlapped_average_is_the_mean_starts_during_the_backward_and_counts_micro_batches(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_overlap_worker, args=(str(tmp_path),), nprocs=2)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert all(result["equal"]) and result["reset"], result
        assert all(result["bf16_equal"]) and result["bf16_differs"], result  # parallel.grad_reduce_dtype=bf16
        assert "3 gradients in a step of 2 micro-batches" in result["refused"], result
        # the last micro-batch's backward starts the buckets of `last` and `first` (the reversed order puts
        # `only_rank1`'s first, which rank 0 never fills, so there the others wait for finish())
        assert result["started"][0] == 0, result
    assert results[1]["started"][1] == results[1]["buckets"], results[1]
    assert results[0]["started"][1] == 0, results[0]


LAYOUTS = {
    # the tensor-parallel sums come after the overlapped average; 2 micro-batches per rank and step
    "tp2 sp x dp2": ([], ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp=2"], 4),
    # gradients completed by the pipeline schedule's backward passes, the tied embedding's on two stages
    "pp2 x dp2": ([], ["parallel.pp=2", "parallel.dp=2"], 4),
    # experts that a micro-batch leaves without tokens on one rank only
    "moe+mtp dp2": ([*MOE, *MTP], [*MOE, *MTP, "parallel.dp=2"], 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_overlapped_reduction_matches_one_process(shared_run, name):
    model, extra, nproc = LAYOUTS[name]
    ref_dir, _ = shared_run(*model)  # one process (the session's references of test_zero and test_moe_parallel)
    run_dir, _ = shared_run(*extra, "train.micro_batch_size=2", *OVERLAP, nproc=nproc)
    assert_curve_matches(run_dir, ref_dir, also=("moe/", "mtp/"))
    assert_final_checkpoint_matches(run_dir, ref_dir, exact=("expert_bias",))
