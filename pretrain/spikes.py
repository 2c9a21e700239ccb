"""Loss spikes: a step whose training loss lies more than `zscore` standard deviations above the mean of the
recent steps before it. One spike is noise a run recovers from; `max_spikes` of them within `window` steps mean
the run is diverging (or reading bad data), and it stops with the spikes listed instead of burning GPU-hours.

Spikes do not enter the statistics they are measured against. Every rank sees the same (all-reduced) loss, so all
decide alike without communicating.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


class LossSpikeError(FloatingPointError):
    """Too many loss spikes within the window: the run stops."""


@dataclass
class Spike:
    step: int
    loss: float
    mean: float
    std: float

    def describe(self) -> str:
        return f"step {self.step}: loss {self.loss:.4g} vs {self.mean:.4g} ± {self.std:.2g}"


class LossSpikeDetector:
    def __init__(self, zscore: float, window: int = 50, max_spikes: int = 3, min_history: int = 10):
        self.zscore, self.window, self.max_spikes, self.min_history = zscore, window, max_spikes, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.spikes: list[Spike] = []

    def observe(self, step: int, loss: float) -> Spike | None:
        """Records one step's loss; returns the spike it is, if any; raises LossSpikeError at the limit."""
        if self.zscore <= 0 or not math.isfinite(loss):
            return None
        spike = None
        if len(self.history) >= self.min_history:
            mean, std = statistics.fmean(self.history), statistics.pstdev(self.history)
            if loss > mean + self.zscore * max(std, 1e-6 * abs(mean), 1e-12):
                spike = Spike(step, loss, mean, std)
        if spike is None:
            self.history.append(loss)
            return None
        self.spikes = [s for s in self.spikes if s.step > step - self.window] + [spike]
        if len(self.spikes) >= self.max_spikes:
            listed = "; ".join(s.describe() for s in self.spikes)
            raise LossSpikeError(
                f"{len(self.spikes)} loss spikes within {self.window} steps (more than {self.zscore:g} standard "
                f"deviations above the recent mean): {listed}. The run stops rather than train on: lower optim.lr, "
                "check the data, resume from an earlier checkpoint, or raise train.spike_zscore / "
                "train.max_spikes")
        return spike
