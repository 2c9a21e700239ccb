"""Heartbeats in a real c10d store: a rank names the ranks behind its place in the loop (a lower count of phases
entered), or missing once training runs; the watchdog writes a stalled rank's place (and says so on stderr)."""

import time

import torch.distributed as dist

from pretrain.heartbeat import Heartbeat


def ranks(store, places: list[tuple[int, str, int, int]], timeout_s: float = 60.0) -> list[Heartbeat]:
    return [Heartbeat(store, rank, len(places), (lambda p=p: p), timeout_s) for rank, p in enumerate(places)]


def test_ranks_behind_are_named_with_their_step_and_phase():
    store = dist.HashStore()
    me, stuck, waiting, _ = ranks(store, [(3, "stop check", 40, 0), (3, "on_step_end callbacks", 38, 0),
                                         (3, "stop check", 40, 0), (0, "setup", 1, 0)])
    for heartbeat in (me, stuck, waiting):
        heartbeat.beat()
    assert [p.split(", last heard")[0] for p in me.behind()] == [
        "rank 1 (step 3, on_step_end callbacks", "rank 3 (no heartbeat yet)"]
    before_training = Heartbeat(store, 0, 4, lambda: (0, "setup", 1, 0), 60.0)
    assert [p.split(" (")[0] for p in before_training.behind()] == []  # nobody is behind setup; none missing yet


def test_only_the_ranks_furthest_behind_are_named():
    """A dead rank's peers fail together, each before writing its place in the failed collective: those that got
    as far as this rank's previous phase are not named, only the one furthest behind."""
    store = dist.HashStore()
    me, peer, dead = ranks(store, [(3, "gradient sync", 41, 0), (3, "step start", 40, 0), (2, "step start", 30, 0)])
    for heartbeat in (me, peer, dead):
        heartbeat.beat()
    assert [p.split(", last heard")[0] for p in me.behind()] == ["rank 2 (step 2, step start"]


def test_watchdog_writes_a_stalled_ranks_place(capfd):
    store = dist.HashStore()
    place = [(2, "step start", 10, 5)]
    stalled = Heartbeat(store, 1, 2, lambda: place[0], timeout_s=0.4)
    stalled.beat()
    place[0] = (2, "on_step_end callbacks", 14, 7)  # it moved on, then stopped moving
    stalled.start()
    time.sleep(1.0)
    stalled.stop()
    waiting = Heartbeat(store, 0, 2, lambda: (2, "stop check", 15, 7), 60.0)
    assert waiting.behind()[0].startswith("rank 1 (step 2, on_step_end callbacks, last heard")
    assert "rank 1: no progress for" in capfd.readouterr().err


def test_no_store_means_no_names_and_no_errors():
    heartbeat = Heartbeat(None, 0, 2, lambda: (1, "x", 1, 0), 60.0)
    heartbeat.beat()
    assert heartbeat.behind() == []
