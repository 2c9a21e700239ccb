"""Faults the reliability tests inject for real; inert unless their environment variable is set.

    PRETRAIN_TEST_KILL=RANK:STEP:WHERE   that rank SIGKILLs itself at that step. WHERE is "step" (as the step starts:
                                         its peers then wait for it in the step's collectives) or "save" (once it
                                         has written its shards of the step's checkpoint, before the checkpoint is
                                         committed).
    PRETRAIN_TEST_SIGNAL=WHERE[:STEP]    every rank sends itself SIGTERM at that point: "setup" (the trainer and
                                         its data loaders built, before the first step), "evaluation" (as the
                                         evaluation after step STEP starts), "error report" (just before a
                                         failed command prints its error: the launcher's stop reaching a rank
                                         whose peer has failed) or "between phases" (`pretrain recipe`, once a
                                         phase and its evaluation are done).
    PRETRAIN_TEST_SLOW=RANK:SECONDS      that rank sleeps this long in every step before the gradient reduction (a
                                         straggler).
"""

from __future__ import annotations

import os
import signal

KILL, SLOW, SIGNAL = "PRETRAIN_TEST_KILL", "PRETRAIN_TEST_SLOW", "PRETRAIN_TEST_SIGNAL"


def kill_point(step: int, where: str) -> None:
    spec = os.environ.get(KILL)
    if not spec:
        return
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if spec == f"{rank}:{step}:{where}":
        os.kill(os.getpid(), signal.SIGKILL)


def slow_point() -> None:
    spec = os.environ.get(SLOW)
    if not spec:
        return
    import time

    import torch.distributed as dist

    rank, seconds = spec.split(":")
    if int(rank) == (dist.get_rank() if dist.is_initialized() else 0):
        time.sleep(float(seconds))


def signal_point(where: str, step: int | None = None) -> None:
    spec = os.environ.get(SIGNAL)
    if spec and spec == (where if step is None else f"{where}:{step}"):
        os.kill(os.getpid(), signal.SIGTERM)
