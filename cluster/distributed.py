"""Joining the process group: the same entry point runs alone, under torchrun, or under srun."""

from __future__ import annotations

import datetime
import faulthandler
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('node[03-05,9],gpu1' -> 'node03'), as `scontrol show hostnames` would
    list it first."""
    first = nodelist.strip()
    depth = 0
    for i, char in enumerate(first):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            first = first[:i]
            break
    if "[" not in first:
        return first
    prefix, ranges = first.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def slurm_rendezvous(env: dict[str, str]) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT under srun: as set, else the job's first node and a port derived from the job id
    (jobs sharing a node get different ports)."""
    addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 30000)
    return addr, port


def env_from_launcher() -> DistEnv:
    """Rank and world size from torchrun's variables, else from SLURM's (one srun task per process, with
    SLURM_STEP_NUM_TASKS > 1), else a single process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    tasks = env.get("SLURM_STEP_NUM_TASKS")  # set by srun for its tasks, not in the batch script itself
    if tasks and int(tasks) > 1 and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(tasks), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


NCCL_WATCHDOG_DEFAULTS = {
    # On a timeout or a dead peer the watchdog aborts the communicator and the error reaches Python as an
    # exception in the next collective, which the trainer names by rank, phase and step like gloo's (the default,
    # 3, kills the process from the watchdog thread, where no Python runs).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # The flight recorder: each rank keeps its last 2,000 collectives (operation, group, sizes, state) and writes
    # them on a timeout (TORCH_FR_DUMP_TEMP_FILE, default /tmp/nccl_trace_rank_<rank>), which names the
    # collective where ranks diverged (`torchfrtrace` reads the files).
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}


def nccl_watchdog_environment(env: dict[str, str]) -> dict[str, str]:
    """The NCCL watchdog settings to apply: ours where the user has not set the variable."""
    return {name: value for name, value in NCCL_WATCHDOG_DEFAULTS.items() if name not in env}


def init_distributed(timeout_s: float) -> DistEnv:
    """Initializes torch.distributed when launched with more than one process; collectives that wait longer
    than `timeout_s` (e.g. on a dead rank) raise instead of hanging."""
    denv = env_from_launcher()
    if denv.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(denv.rank))
        os.environ.setdefault("WORLD_SIZE", str(denv.world_size))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:  # srun: derived from the job
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = slurm_rendezvous(dict(os.environ))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        faulthandler.enable()  # a rank killed by a signal still prints every thread's Python stack
        if backend == "nccl":
            os.environ.update(nccl_watchdog_environment(dict(os.environ)))
            torch.cuda.set_device(denv.local_rank)
        dist.init_process_group(
            backend, rank=denv.rank, world_size=denv.world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return denv


def finish_distributed() -> None:
    """After a rank's work has ended normally: waits for the others, then tears the process groups down. A
    process that exits with gloo's groups alive can abort in their destructors ("terminate called without an
    active exception") once the interpreter is gone, so a finished rank would fail its job. Not called after an
    error: a peer may still be inside a collective, and the barrier would wait for it until the timeout."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
