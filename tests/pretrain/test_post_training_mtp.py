"""What a fine-tuning phase does with the multi-token-prediction modules of its starting checkpoint (`train.mtp`):
train them as pretraining does, freeze them (unchanged, their loss not computed), or drop them from the model."""

from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint import MODEL, CheckpointError, read_meta
from pretrain.config import load_config
from pretrain.consolidate import full_tensors

from .conftest import BASE_RUN, SFT, TINY_MODEL
from .test_train_e2e import run, train_losses

PHASE = ["train.steps=2", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
         "train.checkpoint_every=2", "tracking.mlflow=false", "tracking.progress_bar=false", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def mtp_base(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mtp_base")
    run([*TINY_MODEL, f"data.dir={tiny_data}", *BASE_RUN, "model.mtp_depth=1"], run_dir)
    return run_dir / "checkpoints" / "step_00000004"


def fine_tune(mtp_base, tiny_chat, run_dir, *extra):
    overrides = [*TINY_MODEL, f"data.dir={tiny_chat}", *SFT, "model.mtp_depth=1", f"train.init_from={mtp_base}",
                 *PHASE, *extra]
    run(overrides, run_dir)
    return full_tensors(run_dir / "checkpoints" / "step_00000002", MODEL)


def test_mtp_train_freeze_and_drop(mtp_base, tiny_chat, tmp_path):
    start = full_tensors(mtp_base, MODEL)
    mtp_names = [name for name in start if name.startswith("mtp.")]
    assert mtp_names

    trained = fine_tune(mtp_base, tiny_chat, tmp_path / "train")
    assert all(not torch.equal(trained[name], start[name]) for name in mtp_names if not name.endswith("norm.weight"))
    assert "mtp/1" in read_train(tmp_path / "train")[1]

    frozen = fine_tune(mtp_base, tiny_chat, tmp_path / "freeze", "train.mtp=freeze")
    assert all(torch.equal(frozen[name], start[name]) for name in mtp_names)  # kept, unchanged
    assert not torch.equal(frozen["layers.0.attn.q_proj.weight"], start["layers.0.attn.q_proj.weight"])
    assert "mtp/1" not in read_train(tmp_path / "freeze")[1]
    # the same first step's main loss; after it, the trunk trained without the MTP loss's gradient differs
    frozen_losses, trained_losses = train_losses(tmp_path / "freeze"), train_losses(tmp_path / "train")
    assert frozen_losses[1] == pytest.approx(trained_losses[1], rel=1e-6)
    assert frozen_losses[2] != pytest.approx(trained_losses[2], rel=1e-6)

    dropped = fine_tune(mtp_base, tiny_chat, tmp_path / "drop", "train.mtp=drop")
    assert not any(name.startswith("mtp.") for name in dropped)
    assert load_config(tmp_path / "drop" / "config.yaml", check_paths=False).model.mtp_depth == 0
    assert "mtp" not in str(read_meta(tmp_path / "drop" / "checkpoints" / "step_00000002").tensor_shapes())

    with pytest.raises(CheckpointError, match="unexpected.*mtp"):  # leaving them out is a choice, never silent
        fine_tune(mtp_base, tiny_chat, tmp_path / "silent", "model.mtp_depth=0")


def read_train(run_dir):
    from pretrain.callbacks.metrics_log import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}
