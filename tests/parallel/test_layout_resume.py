"""Checkpoints do not depend on the layout that wrote them: a run saved at one layout (tensor, sequence, data or
pipeline parallel) resumes at another and continues the uninterrupted single-process loss curve, optimizer
state and data stream included (fp32, tolerance 2e-4 on the loss per step)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.callbacks.metrics_log import read_metrics

ROOT = Path(__file__).parents[2]
TOL = 2e-4


def overrides(data_dir):
    return [
        "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.max_seq_len=64", "data.seq_len=64", f"data.dir={data_dir}", "data.num_workers=0",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.precision=fp32", "train.steps=8",
        "train.log_every=1", "train.eval_every=8", "train.eval_batches=1", "train.checkpoint_every=4",
        "train.keep_last=3", "optim.warmup_steps=2", "tracking.mlflow=false",
    ]


def train(data_dir, run_dir, *extra, nproc=None, resume=None):
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
           *overrides(data_dir), *extra]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    if resume:
        cmd += ["--resume", str(resume)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"}


@pytest.fixture(scope="module")
def single(parallel_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    return run_dir, train(parallel_data, run_dir)


@pytest.mark.parametrize(
    "writer,reader",
    [
        (["parallel.tp=2", "parallel.sequence_parallel=true"], []),  # TP=2 (+SP) -> TP=1
        (["parallel.dp=2"], []),  # DP=2 -> DP=1
        (["parallel.tp=2"], ["parallel.dp=2"]),  # TP=2 -> DP=2
        (["parallel.pp=2"], []),  # PP=2 -> PP=1
        (["parallel.pp=2"], ["parallel.tp=2"]),  # PP=2 -> TP=2
    ],
    ids=["tp2sp->tp1", "dp2->dp1", "tp2->dp2", "pp2->pp1", "pp2->tp2"],
)
def test_resume_at_another_layout_continues_the_curve(parallel_data, single, tmp_path, writer, reader):
    _, reference = single
    sharded = train(parallel_data, tmp_path / "written", *writer, nproc=2)
    for step in range(1, 9):
        assert abs(sharded[step] - reference[step]) < TOL, (step, sharded[step], reference[step])
    checkpoint = tmp_path / "written" / "checkpoints" / "step_00000004"
    nproc = 2 if reader else None
    resumed = train(parallel_data, tmp_path / "resumed", *reader, nproc=nproc, resume=checkpoint)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert abs(resumed[step] - reference[step]) < TOL, (step, resumed[step], reference[step])


@pytest.mark.parametrize("reader", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp1->tp2", "pp1->pp2"])
def test_single_process_checkpoint_resumes_sharded(parallel_data, single, tmp_path, reader):
    run_dir, reference = single
    resumed = train(parallel_data, tmp_path / "resumed", *reader, nproc=2,
                    resume=run_dir / "checkpoints" / "step_00000004")
    for step in range(5, 9):
        assert abs(resumed[step] - reference[step]) < TOL, (step, resumed[step], reference[step])
