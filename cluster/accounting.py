"""GPU-hour accounting: a run's ledger of wall time × accelerators, per phase and per attempt.

Each attempt (a start of `pretrain train`, first or resumed) splits its wall time, as rank 0 sees it, into
categories that add up to the whole: `startup` (process start to the first step, checkpoint loading aside),
`training` (steps, with their logging), `evaluation`, `checkpoint_save`, `checkpoint_load`, `other` (the end of
the run: summary, tracking uploads), and two kinds of **badput**, time that bought nothing:

- `badput_lost`: work a failed attempt did after the checkpoint the next attempt resumed from. The crash threw it
  away and those steps are computed again (`steps_recomputed`); counted once, where it was lost. An attempt that
  died without a trace after its last record loses that tail too, which no record holds (a crash of rank 0 is
  only known from the next start).
- `badput_restart`: the startup and checkpoint loading of every attempt after the first (what a restart costs).

An attempt's accelerator-hours are its wall seconds × its accelerators / 3600 (on CPU, an accelerator is a
process). The ledger lives in RUN_DIR/accounting.json (rewritten at every logged step, checkpoint and end) and in
every checkpoint's trainer state, so restarts add up even when the run folder is copied without it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.atomic_file import write_atomically

LEDGER_FILE = "accounting.json"
CATEGORIES = ("startup", "training", "evaluation", "checkpoint_save", "checkpoint_load", "other", "badput_lost",
              "badput_restart")
BADPUT = ("badput_lost", "badput_restart")
WORK = ("training", "evaluation")  # what a crash after the last checkpoint throws away
STATUSES = ("running", "finished", "stopped", "failed", "ended")  # ended: no end recorded, nothing lost


@dataclass
class Attempt:
    number: int
    started_at: float  # unix time the attempt's processes started
    updated_at: float  # unix time of its latest record
    accelerators: int
    hardware: str
    first_step: int  # the step it started from
    last_step: int  # the last step it finished
    status: str = "running"  # one of STATUSES; stopped: on a signal, checkpoint saved
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    # the work seconds (training + evaluation) done when each checkpoint step was saved: what a crash keeps
    checkpoints: dict[str, float] = field(default_factory=dict)
    steps_recomputed: int = 0  # steps of this attempt that the next one computed again

    @property
    def wall_seconds(self) -> float:
        return sum(self.seconds.values())

    def accelerator_hours(self, categories: tuple[str, ...] = CATEGORIES) -> float:
        return sum(self.seconds[c] for c in categories) * self.accelerators / 3600

    def work_seconds(self) -> float:
        return sum(self.seconds[c] for c in WORK)

    def seconds_per_checkpoint_save(self) -> float | None:
        """The measured wall time of one of its checkpoint saves (what a preemption warning must leave room for)."""
        return self.seconds["checkpoint_save"] / len(self.checkpoints) if self.checkpoints else None

    def seconds_per_step(self) -> float | None:
        steps = self.last_step - self.first_step
        return self.seconds["training"] / steps if steps > 0 else None

    def settle_before_resume(self, resumed_step: int) -> None:
        """The next attempt resumes from `resumed_step`: what this attempt did after it is lost, and if it had not
        ended cleanly, it failed."""
        if resumed_step >= self.last_step:
            if self.status == "running":  # no end recorded, nothing lost
                self.status = "ended"
            return
        if self.status == "running":
            self.status = "failed"
        kept = self.checkpoints.get(str(resumed_step), 0.0)  # a checkpoint of an earlier attempt: none of it kept
        lost = max(0.0, self.work_seconds() - kept)
        share = lost / self.work_seconds() if self.work_seconds() else 0.0
        for category in WORK:  # moved out of the work categories in proportion, so the total stays the wall time
            moved = self.seconds[category] * share
            self.seconds[category] -= moved
            self.seconds["badput_lost"] += moved
        self.steps_recomputed = self.last_step - max(resumed_step, self.first_step)


@dataclass
class Ledger:
    phase: str
    flops_per_token: float = 0.0  # the model's training FLOPs per token (6·N_active plus attention)
    peak_flops: float = 0.0  # per accelerator, in the precision the run used (MFU's denominator)
    precision: str = ""
    tokens: int = 0  # tokens trained in the phase's kept progress (the newest step reached)
    steps: int = 0
    attempts: list[Attempt] = field(default_factory=list)

    # -- totals --------------------------------------------------------------------------------------
    def accelerator_hours(self, categories: tuple[str, ...] = CATEGORIES) -> float:
        return sum(a.accelerator_hours(categories) for a in self.attempts)

    def badput_share(self) -> float:
        total = self.accelerator_hours()
        return self.accelerator_hours(BADPUT) / total if total else 0.0

    def mfu(self) -> float | None:
        """Achieved over the whole phase: the kept tokens' FLOPs over every accelerator-second spent."""
        seconds = self.accelerator_hours() * 3600
        if not seconds or not self.peak_flops:
            return None
        return self.tokens * self.flops_per_token / (seconds * self.peak_flops)

    def hardware(self) -> str:
        return ", ".join(dict.fromkeys(f"{a.accelerators} × {a.hardware}" for a in self.attempts))

    def steps_recomputed(self) -> int:
        return sum(a.steps_recomputed for a in self.attempts)

    def totals(self) -> dict[str, Any]:
        return {
            "phase": self.phase, "attempts": len(self.attempts), "hardware": self.hardware(),
            "accelerator_hours": self.accelerator_hours(),
            **{f"{c}_hours": self.accelerator_hours((c,)) for c in CATEGORIES},
            "badput_hours": self.accelerator_hours(BADPUT), "badput_share": self.badput_share(),
            "steps_recomputed": self.steps_recomputed(), "tokens": self.tokens, "steps": self.steps, "mfu": self.mfu(),
        }

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        fields = {k: v for k, v in data.items() if k not in ("version", "attempts")}
        attempts = []
        for a in data.get("attempts", []):
            seconds = {**dict.fromkeys(CATEGORIES, 0.0), **a.get("seconds", {})}
            attempts.append(Attempt(**{**a, "seconds": seconds}))
        return cls(**fields, attempts=attempts)

    def save(self, path: Path) -> None:
        """Atomically: a reader (or a crash) never sees half a file."""
        write_atomically(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Ledger:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path} is not a readable accounting ledger: {exc}") from None


def newer(a: Ledger | None, b: Ledger | None) -> Ledger | None:
    """Of the run folder's ledger and a checkpoint's, the one that has seen more (the folder's, unless it was
    lost or belongs to an older copy)."""
    if a is None or b is None:
        return a or b
    key = lambda ledger: (len(ledger.attempts), ledger.attempts[-1].updated_at if ledger.attempts else 0.0)  # noqa: E731
    return a if key(a) >= key(b) else b


class Stopwatch:
    """Charges every second of an attempt to exactly one category: the one entered last (`charge`), so the
    categories always add up to the attempt's wall time."""

    def __init__(self, attempt: Attempt, clock=time.time):
        self.attempt = attempt
        self.clock = clock
        self.category = "startup"
        self.since = attempt.started_at

    def charge(self, category: str) -> str:
        """From now on, time goes to `category`; returns the one it replaces."""
        assert category in CATEGORIES, category
        now = self.clock()
        self.attempt.seconds[self.category] += max(0.0, now - self.since)
        self.attempt.updated_at = now
        previous, self.category, self.since = self.category, category, now
        return previous

    def flush(self) -> None:
        self.charge(self.category)


def read_ledger_folders(path: Path) -> list[tuple[Path, Ledger]]:
    """A run folder's ledger, or each phase's in a recipe folder (the phases in the order the recipe ran them,
    as its results.json lists them, else by name), each with its folder. A ledger file may be given directly."""
    path = Path(path)
    if path.is_file():
        return [(path.parent, Ledger.load(path))]
    if (path / LEDGER_FILE).is_file():
        return [(path, Ledger.load(path / LEDGER_FILE))]
    phase_dirs = [d for d in sorted(path.iterdir()) if (d / LEDGER_FILE).is_file()] if path.is_dir() else []
    results = path / "results.json"
    if results.is_file():
        order = [r.get("phase") for r in json.loads(results.read_text())]
        phase_dirs.sort(key=lambda d: order.index(d.name) if d.name in order else len(order))
    if not phase_dirs:
        raise ValueError(f"{path} holds no {LEDGER_FILE}: not a run folder of `pretrain train` or `pretrain recipe`")
    return [(d, Ledger.load(d / LEDGER_FILE)) for d in phase_dirs]


def read_ledgers(path: Path) -> list[Ledger]:
    return [ledger for _, ledger in read_ledger_folders(path)]
