"""Runs of the real `pretrain train` command for the parallel tests: one small model and config, any layout."""

import os
import subprocess
import sys
from pathlib import Path

import torch

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
    """Whole parameters and optimizer states of a (sharded) checkpoint."""
    from pretrain.checkpoint import MODEL, OPTIMIZER
    from pretrain.consolidate import full_tensors

    return full_tensors(Path(checkpoint_dir), MODEL), full_tensors(Path(checkpoint_dir), OPTIMIZER)



def assert_curve_matches(run_dir, ref_dir, also: tuple[str, ...] = (), loss_atol: float = 1e-5) -> None:
    """Every one of the 8 training steps: loss within `loss_atol` (1e-5), grad norm within 2e-5 relative (fp32), and
    the metrics whose names start with one of `also` within 1e-4 (relative above 1)."""
    got, want = train_metrics(run_dir), train_metrics(ref_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step]["loss"] - want[step]["loss"]) < loss_atol, (step, got[step], want[step])
        assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) < 2e-5 * want[step]["grad_norm"], step
        for key in want[step]:
            if also and key.startswith(also):
                assert abs(got[step][key] - want[step][key]) < 1e-4 * max(1.0, abs(want[step][key])), (step, key)


def assert_final_checkpoint_matches(run_dir, ref_dir, exact: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """The step-8 checkpoints: the same parameter names, parameters within 5e-5 (those ending in one of `exact`
    equal), every reference AdamW state within 1e-6 (step counts equal). Returns (run's optimizer tensors,
    reference parameters, reference optimizer tensors) for further checks."""
    final = "checkpoints/step_00000008"
    model, optimizer = checkpoint_tensors(Path(run_dir) / final)
    ref_model, ref_optimizer = checkpoint_tensors(Path(ref_dir) / final)
    assert model.keys() == ref_model.keys()
    for key in ref_model:
        atol = 0 if exact and key.endswith(exact) else 5e-5
        assert torch.allclose(model[key], ref_model[key], rtol=0, atol=atol), key
    for key in ref_optimizer:
        atol = 0 if key.endswith("/step") else 1e-6
        assert torch.allclose(optimizer[key].float(), ref_optimizer[key].float(), rtol=0, atol=atol), key
    return optimizer, ref_model, ref_optimizer
