"""Joining the process group: the same entry point runs alone, under torchrun, or under srun."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def env_from_launcher() -> DistEnv:
    """Rank and world size from torchrun's variables, else from SLURM's (srun), else a single process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def init_distributed(timeout_s: float) -> DistEnv:
    """Initializes torch.distributed when launched with more than one process; collectives that wait longer
    than `timeout_s` (e.g. on a dead rank) raise instead of hanging."""
    denv = env_from_launcher()
    if denv.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(denv.rank))
        os.environ.setdefault("WORLD_SIZE", str(denv.world_size))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(denv.local_rank)
        dist.init_process_group(
            backend, rank=denv.rank, world_size=denv.world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return denv
