"""The trainer's side of GPU-hour accounting (the ledger itself is `cluster.accounting`): which category each
second of this attempt goes to, the attempt's place after earlier ones, and the ledger file rank 0 keeps."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from cluster.accounting import LEDGER_FILE, Attempt, Ledger, Stopwatch, newer

RESTART = {"startup": "badput_restart", "checkpoint_load": "badput_restart"}  # after the first attempt


def process_start_time() -> float:
    """Unix time this process started (Linux: from /proc), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def describe_hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    return f"CPU process ({model}, {os.cpu_count()} cores on the machine)"


class RunAccounting:
    def __init__(self, run_dir: Path, phase: str, accelerators: int, device: torch.device, writes: bool,
                 started_at: float | None = None):
        self.path = Path(run_dir) / LEDGER_FILE
        self.writes = writes  # rank 0 keeps the file
        started = process_start_time() if started_at is None else started_at
        self.attempt = Attempt(number=1, started_at=started, updated_at=started, accelerators=accelerators,
                               hardware=describe_hardware(device), first_step=0, last_step=0)
        self.ledger = Ledger(phase=phase)
        self.earlier = self._read_file()  # until begin() knows where this attempt starts: kept as they are
        self._attach(self.earlier)
        self.stopwatch = Stopwatch(self.attempt)
        self.aliases: dict[str, str] = {}

    def _read_file(self) -> Ledger | None:
        if not self.path.is_file():
            return None
        try:
            return Ledger.load(self.path)
        except ValueError as exc:
            if self.writes:
                print(f"warning: {exc}; accounting starts anew from this attempt", flush=True)
            return None

    def _attach(self, earlier: Ledger | None) -> None:
        attempts = earlier.attempts if earlier is not None else []
        self.attempt.number = len(attempts) + 1
        self.ledger.attempts = [*attempts, self.attempt]

    def describe(self, flops_per_token: float, peak_flops: float, precision: str) -> None:
        self.ledger.flops_per_token, self.ledger.peak_flops, self.ledger.precision = (flops_per_token, peak_flops,
                                                                                      precision)

    def charge(self, category: str) -> str:
        return self.stopwatch.charge(self.aliases.get(category, category))

    @contextlib.contextmanager
    def charging(self, category: str):
        previous = self.charge(category)
        try:
            yield
        finally:
            self.stopwatch.charge(previous)

    def begin(self, step: int, from_checkpoint: dict[str, Any] | None) -> None:
        """This attempt starts at `step`: the earlier attempts (the run folder's ledger, or the checkpoint's if that
        has seen more) are settled, and a resumed attempt's start-up is what the restart cost."""
        earlier = newer(self.earlier, Ledger.from_dict(from_checkpoint) if from_checkpoint else None)
        self.attempt.first_step = self.attempt.last_step = step
        self._attach(earlier)
        if earlier is None or not earlier.attempts:
            return
        earlier.attempts[-1].settle_before_resume(step)
        self.stopwatch.flush()
        for category in RESTART:
            self.attempt.seconds["badput_restart"] += self.attempt.seconds[category]
            self.attempt.seconds[category] = 0.0
        self.aliases = RESTART
        if self.stopwatch.category in RESTART:
            self.stopwatch.category = RESTART[self.stopwatch.category]

    def checkpoint_saving(self, step: int) -> None:
        """The work up to `step` is what a checkpoint of it keeps."""
        self.stopwatch.flush()
        self.attempt.last_step = max(self.attempt.last_step, step)
        self.attempt.checkpoints[str(step)] = self.attempt.work_seconds()

    def record(self, step: int, tokens: int, status: str | None = None) -> None:
        self.stopwatch.flush()
        self.attempt.last_step = self.ledger.steps = step
        self.ledger.tokens = tokens
        if status is not None:
            self.attempt.status = status
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.ledger.save(self.path)

    def state(self) -> dict[str, Any]:
        """For the checkpoint: the ledger as of now."""
        self.stopwatch.flush()
        return self.ledger.to_dict()
