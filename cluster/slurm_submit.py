"""Submitting a checked `pretrain launch` job to SLURM through submitit, and (with `--wait`) following it to its end
by the scheduler's job state and the first task's result (submitit's own watcher needs accounting, sacct, which
many clusters — and the local test cluster — do not run)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(spec, folder: Path, params: dict, max_timeouts: int, wait: bool) -> int:
    from submitit.core.utils import FailedJobError
    from submitit.slurm.slurm import SlurmExecutor

    from cluster.job import PretrainJob
    from pretrain.config import ConfigError

    try:
        executor = SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
    except RuntimeError as exc:  # no srun here
        raise ConfigError("--executor", f"slurm: {exc} (or run it here with --executor local)") from None
    executor.update_parameters(**params)
    try:
        job = executor.submit(PretrainJob(spec))
    except (FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        hint = " (is SLURM_CONF exported?)" if "configuration source" in str(exc) else ""
        print(f"error: sbatch refused the job{hint}: {str(exc).strip()[-2000:]}", flush=True)
        return 1
    task0 = job.task(0) if job.num_tasks > 1 else job
    print(f"submitted job {job.job_id}: {job.num_tasks} task(s), run dir {spec.run_dir}\n"
          f"  logs: {task0.paths.stdout} (and .err; task N: {job.job_id}_N_log.*)\n"
          f"  follow: squeue -j {job.job_id}; cancel: scancel {job.job_id}", flush=True)
    return wait_for(job.job_id, task0.paths.result_pickle) if wait else 0


def job_state(job_id: str) -> str | None:
    """The job's state as squeue reports it (PENDING, RUNNING, COMPLETED, ...), None once it is no longer listed."""
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:  # an unknown job id: purged after MinJobAge
        return None
    return result.stdout.strip() or None


def wait_for(job_id: str, result_pickle: Path, poll_s: float = 1.0) -> int:
    """Follows the job through requeues and restarts until it ends: 0 when its first task returned, else 1."""
    from submitit.core.utils import pickle_load

    last = None
    while True:
        state = job_state(job_id)
        if result_pickle.exists():
            outcome, value = pickle_load(result_pickle)
            if outcome == "success":
                print(f"job {job_id} finished: {_describe(value)}", flush=True)
                return 0
            error = str(value).strip().splitlines()[-1]  # the exception's line; the traceback is in the task's log
            print(f"error: job {job_id} failed: {error}\n  (traceback: {result_pickle.parent}/{job_id}_0_log.err)",
                  flush=True)
            return 1
        if state != last:
            print(f"job {job_id}: {state or 'ended'} ({time.strftime('%H:%M:%S')})", flush=True)
            last = state
        if state is None or state in FINAL_STATES:
            time.sleep(2)  # its result may still be on the way
            if not result_pickle.exists():
                print(f"error: job {job_id} ended ({state or 'no longer listed'}) without a result from task 0"
                      f"{_other_tasks_error(result_pickle.parent, job_id)}; logs: {result_pickle.parent}", flush=True)
                return 1
        else:
            time.sleep(poll_s)


def _other_tasks_error(folder: Path, job_id: str) -> str:
    """The first error another task reported (task 0 may have died without reporting)."""
    from submitit.core.utils import pickle_load

    for pickled in sorted(folder.glob(f"{job_id}_*_result.pkl")):
        outcome, value = pickle_load(pickled)
        if outcome == "error":
            return f"; task {pickled.name.split('_')[1]} failed: {str(value).strip().splitlines()[-1]}"
    return ""


def _describe(value) -> str:
    if isinstance(value, dict) and "steps" in value:
        loss = value.get("final_train_loss")
        return f"{value['steps']} steps, train loss {'n/a' if loss is None else f'{loss:.4f}'}"
    if isinstance(value, list):  # a recipe's phase rows
        return ", ".join(f"{row.get('phase')} ({row.get('steps')} steps)" for row in value)
    return str(value)[:200]
