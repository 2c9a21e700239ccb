"""Context parallelism equals one process: loss (and MTP losses) per step, full gradients after step 1, grad norm,
full parameters after 4 AdamW steps (fp32, gloo), for CP=2 alone, with document masking, with MoE + MTP, with MLA
and a sliding window, and CP=2 x TP=2 (+SP), x DP=2, x EP=2, CP=4; through the real Trainer with pipeline
parallelism (interleaved 1F1B, MTP and document masking); with ZeRO-3 in tests/parallel/test_zero.py.

Tolerances as for tensor parallelism (fp32): loss 1e-5, grads 1e-6 (grad scale ~7e-2), grad norm 1e-4, params
5e-4 after 4 steps at lr 1e-2 (measured: loss 1e-6, grads 2e-8, params 1.4e-4 with MoE, whose routing amplifies
reduction-order noise, 2e-5 otherwise). The negative controls (RoPE at local instead of true positions; MoE
balance statistics of the local shard only) are off by far more."""

from pathlib import Path

import pytest
import torch

from parallel.context import ContextParallelError, gathered_order, shard_positions
from tests.parallel.layout_workers import launch as launch_worker
from tests.parallel.test_pipeline_parallel import MASKED
from tests.parallel.test_pipeline_parallel import check as check_trainer
from tests.parallel.test_pipeline_parallel import launch as launch_trainer

WORKER = Path(__file__).with_name("context_parallel_worker.py")


def launch(nproc: int, layouts: list[dict], tmp_path: Path) -> list[dict]:
    return launch_worker(WORKER, nproc, layouts, tmp_path)


def check(result: dict) -> None:
    name = result["layout"]
    assert result["param_moved"] > 1e-2, name  # training really changed the weights
    assert result["loss_diff"] < 1e-5, (name, result["losses"])
    assert result["mtp_diff"] < 1e-5, name
    assert result["grad_diff"] < 1e-6, name
    assert result["norm_diff"] < 1e-4, name
    assert result["param_diff"] < 5e-4, name


TWO_RANKS = {
    "cp2": {"cp": 2},
    "cp2, document masking": {"cp": 2, "documents": True},
    "cp2, MoE + MTP(2)": {"cp": 2, "moe": True, "mtp": 2},
    "cp2, MLA + sliding window": {"cp": 2, "mla": True, "window": 8},
    "broken: local positions": {"cp": 2, "break": "positions"},
    "broken: local MoE statistics": {"cp": 2, "moe": True, "break": "moe_statistics"},
}
FOUR_RANKS = {
    "cp2 x tp2 + sp": {"cp": 2, "tp": 2, "sp": True},
    "cp2 x dp2, document masking": {"cp": 2, "dp": 2, "documents": True},
    "cp4": {"cp": 4},
    "cp2 x dp2 x ep2, MoE + MTP": {"cp": 2, "dp": 2, "ep": 2, "moe": True, "mtp": 1},
    "cp2 x tp2 + sp, MoE + MTP, document masking": {"cp": 2, "tp": 2, "sp": True, "moe": True, "mtp": 1,
                                                    "documents": True},
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return dict(zip(TWO_RANKS, launch(2, list(TWO_RANKS.values()), tmp_path_factory.mktemp("cp2")), strict=True))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return dict(zip(FOUR_RANKS, launch(4, list(FOUR_RANKS.values()), tmp_path_factory.mktemp("cp4")), strict=True))


@pytest.mark.parametrize("name", [n for n in TWO_RANKS if not n.startswith("broken")])
def test_two_ranks_match_one_process(two_ranks, name):
    check(two_ranks[name])


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_ranks_match_one_process(four_ranks, name):
    check(four_ranks[name])


def test_negative_control_wrong_positions_are_caught(two_ranks):
    broken = two_ranks["broken: local positions"]
    assert broken["loss_diff"] > 1e-4 and broken["grad_diff"] > 1e-5


def test_negative_control_local_balance_statistics_are_caught(two_ranks):
    """The MoE balance loss needs the whole sequence's expert counts: the shard's alone give other gradients."""
    assert two_ranks["broken: local MoE statistics"]["grad_diff"] > 1e-5


@pytest.fixture(scope="module")
def trainer_runs(parallel_data, tmp_path_factory):
    """The real Trainer (batch split, reported losses, validation) against one process."""
    two = launch_trainer(2, [["parallel.cp=2", "model.mtp_depth=1", *MASKED]], parallel_data,
                         tmp_path_factory.mktemp("cp2_trainer"))
    four = launch_trainer(4, [
        ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2",
         "model.mtp_depth=1", *MASKED],
    ], parallel_data, tmp_path_factory.mktemp("cp2_pp2_trainer"))
    return {"cp2, MTP, document masking": two[0], "pp2 x cp2 interleaved, MTP, document masking": four[0]}


@pytest.mark.parametrize("name", ["cp2, MTP, document masking", "pp2 x cp2 interleaved, MTP, document masking"])
def test_trainer_matches_one_process(trainer_runs, name):
    check_trainer(trainer_runs[name])


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_split_covers_every_position_once_with_equal_causal_work(cp):
    seq = 24 * cp
    shards = [shard_positions(seq, cp, rank) for rank in range(cp)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(seq))
    work = [int((positions + 1).sum()) for positions in shards]  # keys each rank's queries see under causality
    assert len(set(work)) == 1, work
    gathered = torch.cat(shards)
    assert torch.equal(gathered[gathered_order(seq, cp)], torch.arange(seq))


def test_split_needs_two_chunks_per_rank():
    with pytest.raises(ContextParallelError, match="2 x cp = 4"):
        shard_positions(30, 2, 0)
