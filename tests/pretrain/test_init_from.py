"""`pretrain train --init-from`: another run's weights, with a fresh optimizer, schedule and data position."""

import pytest
import torch

from pretrain.callbacks import default_callbacks
from pretrain.callbacks.base import Callback
from pretrain.checkpoint import CheckpointError, load_checkpoint, model_tensors, read_meta
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.trainer import Trainer, check_initialization_source

from .test_train_e2e import StopAfter, train_losses

# the extension phase: 4x the length with YaRN, otherwise the same model
LONGER = ["model.max_seq_len=128", "data.seq_len=128", "model.rope.scaling=yarn", "model.rope.factor=2",
          "model.rope.original_max_seq_len=64", "train.global_batch_size=4"]
PHASE = ["train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1",
         "train.checkpoint_every=2", "tracking.mlflow=false", "tracking.progress_bar=false"]


class AtStart(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_start(self, trainer):
        weights = {k: v.clone() for k, v in model_tensors(trainer.model).items()}  # the live ones train on
        self.seen = {"weights": weights, "optimizer_states": len(trainer.optimizer.state), "step": trainer.step,
                     "windows": trainer.train_loader.consumed_micro_batches}


def phase(tiny_overrides, base_run, run_dir, extra_callbacks=(), resume=None, more=()):
    cfg = load_config(None, [*tiny_overrides, *LONGER, *PHASE, f"train.init_from={base_run['checkpoint']}", *more])
    callbacks = default_callbacks(cfg, run_dir)
    callbacks[-1:-1] = list(extra_callbacks)
    trainer = Trainer(cfg, run_dir, callbacks)
    return trainer, trainer.fit(resume=resume)


def test_starts_from_the_checkpoint_weights_with_fresh_state(tiny_overrides, base_run, tmp_path, capsys):
    start = AtStart()
    trainer, summary = phase(tiny_overrides, base_run, tmp_path / "long", [start])
    base_cfg = load_config(None, [*tiny_overrides])
    reference = base_cfg.model.build()
    load_checkpoint(base_run["checkpoint"], reference, restore_rng_state=False)
    expected = model_tensors(reference)
    assert start.seen["weights"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(start.seen["weights"][name], tensor), name
    assert start.seen["optimizer_states"] == 0 and start.seen["step"] == 0 and start.seen["windows"] == 0
    assert summary["initialized_from"] == {"path": str(base_run["checkpoint"]), "step": 4}
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 128
    out = capsys.readouterr().out
    assert "model changes: max_seq_len 64 -> 128" in out and "rope.scaling none -> yarn" in out
    assert read_meta(tmp_path / "long" / "checkpoints" / "step_00000004").state["initialized_from"]["step"] == 4


def test_a_resumed_phase_continues_its_own_checkpoint(tiny_overrides, base_run, tmp_path):
    _, full = phase(tiny_overrides, base_run, tmp_path / "full")
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        phase(tiny_overrides, base_run, crashed, [StopAfter(2)])
    _, resumed = phase(tiny_overrides, base_run, crashed, resume="auto")
    expected, got = train_losses(tmp_path / "full"), train_losses(crashed)
    assert [got[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]  # not initialized again at step 2
    assert resumed["initialized_from"] == full["initialized_from"]


def test_a_checkpoint_that_does_not_fit_fails_before_training(tiny_overrides, base_run, tmp_path, capsys):
    args = ["train", "configs/tiny.yaml", "--init-from", str(base_run["checkpoint"]), "--run-dir",
            str(tmp_path / "wide"), *tiny_overrides]
    assert main([*args, "model.d_model=128"]) == 1
    err = capsys.readouterr().err
    assert "cannot initialize this model" in err and "embed.weight: [512, 64] there, [512, 128] here" in err
    assert main([*args, "model.n_layers=3"]) == 1
    assert "missing ['layers.2." in capsys.readouterr().err
    assert not (tmp_path / "wide").exists()
    assert main(["train", "configs/tiny.yaml", "--init-from", str(tmp_path / "nothing"), *tiny_overrides]) == 2
    assert "train.init_from" in capsys.readouterr().err


def test_another_tokenizer_is_refused(tiny_overrides, base_run):
    cfg = load_config(None, [*tiny_overrides])
    other = {"path": "elsewhere/tokenizer.json", "sha256": "0" * 64}
    with pytest.raises(CheckpointError, match="another tokenizer"):
        check_initialization_source(read_meta(base_run["checkpoint"]), cfg, other)
