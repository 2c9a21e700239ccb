"""Our tensor-parallel layers against megatron-core's on 2 gloo ranks: same weights and inputs give the same
outputs and gradients (column/row-parallel linears with and without sequence parallelism, vocab-parallel
embedding, vocab-parallel cross-entropy). megatron-core is the `[megatron]` extra, installed by
scripts/test.sh; without it this test fails rather than skips.

Tolerances (fp32): outputs and input grads 1e-5 absolute (values ~50); weight grads 1e-6 relative to their
largest entry (~55: fp32 sums of 24 products, summed in another order by megatron's matmul layout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("megatron_crosscheck_worker.py")
ROOT = WORKER.parents[2]


@pytest.fixture(scope="module")
def diffs(tmp_path_factory) -> dict:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        pytest.fail("megatron-core is missing: install the [megatron] extra (scripts/test.sh does)")
    out = tmp_path_factory.mktemp("megatron") / "diffs.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["tp", "sp"])
def test_column_then_row_parallel_linear_match_megatron(diffs, mode):
    assert diffs[f"mlp_{mode}/output_scale"] > 1.0
    assert diffs[f"mlp_{mode}/output"] < 1e-5
    assert diffs[f"mlp_{mode}/input_grad"] < 1e-5
    scale = diffs[f"mlp_{mode}/weight_grad_scale"]
    assert diffs[f"mlp_{mode}/column_weight_grad"] < 1e-6 * scale
    assert diffs[f"mlp_{mode}/row_weight_grad"] < 1e-6 * scale


@pytest.mark.parametrize("mode", ["tp", "sp"])
def test_vocab_parallel_embedding_matches_megatron(diffs, mode):
    assert diffs[f"embedding_{mode}/vocab_range_mismatch"] == 0.0
    assert diffs[f"embedding_{mode}/output"] < 1e-6
    assert diffs[f"embedding_{mode}/weight_grad"] < 1e-6


def test_vocab_parallel_cross_entropy_matches_megatron(diffs):
    assert diffs["cross_entropy/loss_value"] > 1.0
    assert diffs["cross_entropy/loss"] < 1e-5
    assert diffs["cross_entropy/logits_grad"] < 1e-7


def test_sequence_gather_matches_megatron(diffs):
    assert diffs["gather_sequence"] == 0.0


def test_the_comparison_catches_real_bugs(diffs):
    # a missing backward all-reduce and a softmax over only the local vocabulary are both far outside tolerance
    assert diffs["control/missing_input_grad_all_reduce"] > 1e-2
    assert diffs["control/local_softmax_loss"] > 1e-2
