"""Stopping a run on a signal without losing it: SIGTERM, SIGINT (Ctrl-C), SIGUSR1 or SIGUSR2 (a scheduler's warning
that the time limit or a preemption is near: SLURM's `--signal`, USR2 under submitit) asks the run to stop; the
training loop finishes its step, every rank agrees, a checkpoint is saved and the command exits with
EXIT_RESUMABLE. A second Ctrl-C aborts at once."""

from __future__ import annotations

import abc
import signal
import threading

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request, `--resume auto` continues it
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopSignalHandler(abc.ABC):
    """`self._handle` is the handler of the stop signals for the duration of `with` (set from the main thread only:
    handlers can only be set there); the previous handlers come back at the end."""

    _previous: dict[int, object]

    @abc.abstractmethod
    def _handle(self, signum, frame) -> None: ...

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class StopRequest(StopSignalHandler):
    """Installed for the duration of `with`; `requested` names the signal once one has arrived."""

    def __init__(self, announce: bool = True):
        self.requested: str | None = None
        self.announce = announce

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: no patience left
                raise KeyboardInterrupt(f"second {name}: aborted without saving")
            return
        self.requested = name
        if self.announce:
            print(f"\n{name} received: finishing this step, then saving a checkpoint (Ctrl-C again aborts)",
                  flush=True)
