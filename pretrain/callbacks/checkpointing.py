"""Saves a checkpoint every `train.checkpoint_every` steps and at the end of training."""

from __future__ import annotations

from pretrain.callbacks.base import Callback


class Checkpointing(Callback):
    def on_step_end(self, trainer, metrics) -> None:
        every = trainer.cfg.train.checkpoint_every
        if trainer.step % every == 0 and trainer.step < trainer.cfg.train.steps:
            trainer.save_checkpoint()

    def on_train_end(self, trainer, summary) -> None:
        if trainer.last_saved_step != trainer.step:
            trainer.save_checkpoint(wait=True)
        trainer.wait_for_checkpoint()
