"""A slow rank is named: on logged steps every rank's work before the gradient reduction is gathered, the spread and
the slowest rank go into the metrics, and a warning names a rank that keeps the others waiting (at most once per
100 steps). Injected for real: rank 1 of a DP=2 job sleeps 0.3 s in every step (PRETRAIN_TEST_SLOW)."""

import os
import subprocess
import sys

from tests.parallel.cli_runs import ROOT, overrides, train_metrics


def test_a_slow_rank_is_measured_and_named(parallel_data, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
           *overrides(parallel_data), "parallel.dp=2", "train.steps=4", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRETRAIN_TEST_SLOW": "1:0.3"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = train_metrics(run_dir)
    assert sorted(metrics) == [1, 2, 3, 4]
    for step, record in metrics.items():
        assert record["straggler/slowest_rank"] == 1, (step, record)
        assert record["straggler/skew_s"] > 0.25 and record["straggler/median_s"] < 0.25, (step, record)
    warnings = [line for line in result.stdout.splitlines() if "is a straggler" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: rank 1 (tp=0, cp=0, dp=1, pp=0"), warnings
