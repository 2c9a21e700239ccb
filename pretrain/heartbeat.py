"""Which rank held the others up: every rank's place in the training loop, kept in the job's rendezvous store,
and a watchdog thread that writes it when its rank stops making progress.

A collective that times out fails on the ranks that waited; the one that did not come (stuck in a callback, in
the data loader, SIGSTOPped, dead) says nothing. A rank's place is (step, phase, position): position counts the
phases it has entered, and every rank runs the same phases in the same order, so a lower position is behind. Each
rank writes its place to the store once per step (one small `set`: at 2,048 ranks and a step every few seconds,
hundreds per second for the store), and its watchdog writes it again once the rank has made no progress for half
the collective timeout: ranks waiting in a collective then hold the collective's position, a stuck one its own,
a stopped or dead one its last step's start. A rank whose collective failed reads every entry and names those
behind it: `rank 1 (step 2, on_step_end callbacks, last heard 6 s ago)`. Store errors never stop training: without
a store the message only lacks the names.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

PREFIX = "pretrain/heartbeat/"


class CollectiveError(RuntimeError):
    """A collective that failed or timed out (a dead or stuck rank), named by rank, phase and step."""


def default_store():
    """The store the process group was set up with (torchrun's or the launcher's), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


class Heartbeat:
    """This rank's entry in the store. `state()` gives (step, phase, position, progress) of the training loop at any
    moment: the step being worked on, its phase, the count of phases entered, and a counter that any progress moves
    (each micro-batch read), so a long evaluation or a step of many micro-batches is not taken for a stall."""

    def __init__(self, store, rank: int, world_size: int, state: Callable[[], tuple[int, str, int, int]],
                 timeout_s: float):
        self.store, self.rank, self.world_size, self.state = store, rank, world_size, state
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, step: int, phase: str, position: int) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"{PREFIX}{self.rank}", json.dumps(
                {"step": step, "phase": phase, "position": position, "time": time.time()}))
        except (RuntimeError, ValueError, OSError):
            self.store = None  # the store is gone (its host died): no more heartbeats, training goes on

    def beat(self) -> None:
        """Called once per step by the training loop."""
        step, phase, position, _ = self.state()
        self._write(step, phase, position)

    def start(self) -> None:
        """The watchdog: if (step, phase) has not changed for the collective timeout, this rank says so on stderr
        and in the store (once per stall)."""
        self._thread = threading.Thread(target=self._watch, name="heartbeat-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        last, since, reported = self.state(), time.monotonic(), False
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            now = self.state()
            if now != last:
                last, since, reported = now, time.monotonic(), False
                continue
            if not reported and time.monotonic() - since > self.timeout_s / 2:
                step, phase, position, _ = now
                print(f"rank {self.rank}: no progress for {time.monotonic() - since:.0f} s in phase '{phase}' at "
                      f"step {step} (waiting for other ranks, or stuck here; parallel.timeout_s={self.timeout_s:g})",
                      file=sys.stderr, flush=True)
                self._write(step, phase, position)
                reported = True

    def behind(self) -> list[str]:
        """The other ranks furthest behind this rank's place (those whose last entry has the lowest position, or
        is missing once the training loop has started), as phrases: the ones that held the others up. Ranks that
        are behind by less were waiting in the same collective and had not written their place yet."""
        step, _, position, _ = self.state()
        if self.store is None:
            return []
        store = self.store
        try:
            store.set_timeout(timedelta(seconds=2))
        except (RuntimeError, AttributeError):
            pass
        missing, behind = [], []  # (rank, phrase); behind: also the position
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            key = f"{PREFIX}{rank}"
            try:
                if not store.check([key]):
                    if step > 0:  # in the training loop every rank has written one
                        missing.append((rank, f"rank {rank} (no heartbeat yet)"))
                    continue
                entry = json.loads(store.get(key))
            except (RuntimeError, ValueError, OSError):
                break  # the store went away while reading
            if entry["position"] < position:
                behind.append((entry["position"], rank, f"rank {rank} (step {entry['step']}, {entry['phase']}, "
                                                        f"last heard {time.time() - entry['time']:.0f} s ago)"))
        furthest = min((p for p, _, _ in behind), default=None)
        named = missing + [(rank, phrase) for p, rank, phrase in behind if p == furthest]
        return [phrase for _, phrase in sorted(named)]
