"""Loss spikes: the detector's statistics, and a real run reading garbage windows stopped with the spikes listed."""

import pytest
import torch

from pretrain.callbacks import default_callbacks
from pretrain.config import load_config
from pretrain.spikes import LossSpikeDetector, LossSpikeError
from pretrain.trainer import Trainer


def test_a_spike_is_named_and_kept_out_of_the_statistics():
    detector = LossSpikeDetector(zscore=4, window=20, max_spikes=3, min_history=5)
    for step, loss in enumerate([3.0, 3.1, 2.9, 3.0, 3.05, 2.95], start=1):
        assert detector.observe(step, loss) is None
    spike = detector.observe(7, 4.0)
    assert spike is not None and spike.step == 7 and spike.mean == pytest.approx(3.0)
    assert list(detector.history)[-1] == 2.95  # the spike did not join the history
    assert detector.observe(8, 3.02) is None


def test_spikes_outside_the_window_do_not_count_and_zero_is_off():
    detector = LossSpikeDetector(zscore=4, window=10, max_spikes=2, min_history=3)
    losses = {step: 3.0 + 0.01 * (step % 3) for step in range(1, 30)}
    losses[5] = losses[20] = 9.0  # two spikes 15 steps apart: never two within 10 steps
    for step, loss in losses.items():
        detector.observe(step, loss)
    with pytest.raises(LossSpikeError, match="2 loss spikes within 10 steps"):
        detector.observe(25, 9.0)
    off = LossSpikeDetector(zscore=0)
    assert all(off.observe(step, 100.0 * step) is None for step in range(1, 50))


def test_a_run_reading_garbage_stops_at_the_second_spike(tiny_overrides, tmp_path, capsys):
    cfg = load_config(None, [*tiny_overrides, "train.steps=30", "train.log_every=1", "train.eval_every=100",
                             "train.eval_batches=0", "train.checkpoint_every=100", "tracking.mlflow=false",
                             "tracking.progress_bar=false", "train.spike_zscore=4", "train.max_spikes=2"])
    trainer = Trainer(cfg, tmp_path / "run", default_callbacks(cfg, tmp_path / "run"))
    next_batch = trainer.next_batch

    def garbage_at_steps_20_and_21(loader):
        batch = next_batch(loader)
        if trainer.step + 1 in (20, 21) and trainer.model.training:
            labels = torch.randint(0, cfg.model.vocab_size, batch["labels"].shape)
            batch = {**batch, "labels": labels}  # random targets: the loss jumps to about ln(vocab) or more
        return batch

    trainer.next_batch = garbage_at_steps_20_and_21
    with pytest.raises(LossSpikeError, match=r"2 loss spikes within 50 steps .*step 20: .*step 21: "):
        trainer.fit()
    assert trainer.step == 21
    assert "warning: loss spike at step 20" in capsys.readouterr().out
