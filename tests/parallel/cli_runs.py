"""Runs of the real `pretrain train` command for the parallel tests: one small model and config, any layout."""

import os
import subprocess
import sys
from pathlib import Path

from pretrain.callbacks.metrics_log import read_metrics

ROOT = Path(__file__).parents[2]


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
    return {step: r["loss"] for step, r in train_metrics(run_dir).items()}


def train_metrics(run_dir) -> dict[int, dict]:
    """The logged training records of a run, by step."""
    return {r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"}


def checkpoint_tensors(checkpoint_dir) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    return load_file(checkpoint_dir / "model.safetensors"), load_file(checkpoint_dir / "optimizer.safetensors")

