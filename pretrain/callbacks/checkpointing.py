"""Saves a checkpoint every `train.checkpoint_every` steps (the trainer saves the last one itself)."""

from __future__ import annotations

from pretrain.callbacks.base import Callback


class Checkpointing(Callback):
    def on_step_end(self, trainer, metrics) -> None:
        every = trainer.cfg.train.checkpoint_every
        if trainer.step % every == 0 and trainer.step < trainer.cfg.train.steps:
            trainer.save_checkpoint()
