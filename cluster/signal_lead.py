"""How long before the time limit SLURM's warning signal should come: long enough to finish the step in flight,
save a checkpoint and requeue. Derived from what an earlier attempt of the run measured (its ledger,
RUN_DIR/accounting.json, or each phase's for a recipe folder); a stated default when nothing was measured yet."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cluster.accounting import read_ledgers

DEFAULT_LEAD_S = 120  # no measurement yet: two minutes, SLURM's own resolution for --signal is up to 60 s
MARGIN_S = 30  # signal delivery, the processes' exit and the requeue itself
SAFETY = 2.0  # the measured save and step, twice over: a slower filesystem or a busier node on the next attempt


@dataclass(frozen=True)
class SignalLead:
    seconds: int
    reason: str


def measured_seconds(run_dir: Path) -> tuple[float, float] | None:
    """(the longest average checkpoint save, the longest average step) over the attempts recorded in the run folder's
    ledger (or its phases'), or None when no attempt saved a checkpoint yet or there is no readable ledger."""
    try:
        attempts = [a for ledger in read_ledgers(run_dir) for a in ledger.attempts]
    except (OSError, ValueError):
        return None
    saves = [s for a in attempts if (s := a.seconds_per_checkpoint_save()) is not None]
    steps = [s for a in attempts if (s := a.seconds_per_step()) is not None]
    return (max(saves), max(steps, default=0.0)) if saves else None


def signal_lead(run_dir: Path) -> SignalLead:
    measured = measured_seconds(run_dir)
    if measured is None:
        return SignalLead(DEFAULT_LEAD_S, f"default: no checkpoint save measured in {run_dir} yet")
    save, step = measured
    seconds = math.ceil(MARGIN_S + SAFETY * (save + step))
    return SignalLead(seconds, f"derived from {run_dir}: {MARGIN_S} s + {SAFETY:g} x (checkpoint save {save:.1f} s "
                               f"+ step {step:.2f} s), the longest measured")
