"""The last line of a `pretrain launch` batch script: `python -m cluster.restart FOLDER JOB_ID STATUS`, run once srun
has ended with STATUS. A failed attempt (STATUS > 0) with restarts left is requeued as the same job with
`--resume auto`, its restart count one higher (the count travels in the job's submission, so it survives the
requeue). Nothing happens after a success, after a stop that the first task already requeued (cluster/job.py), or
once `--max-restarts` is used up (the tasks then failed with RestartsExhausted). Exits with STATUS, so a job that
is not restarted ends as FAILED.

Here, not in a task: a crashed rank (or node) cannot requeue the job itself, and the batch script outlives it."""

from __future__ import annotations

import os
import subprocess
import sys

from submitit.core.utils import DelayedSubmission, JobPaths, temporary_save_path

from cluster.job import PretrainJob, requeue_marker


def restart_if_allowed(folder: str, job_id: str, status: int) -> str:
    """What happened to the job, for its log: "job N <this>"."""
    if status == 0:
        return "ended normally"
    if requeue_marker(folder, job_id).exists():
        return "was stopped and has been requeued by its first task"
    paths = JobPaths(folder, job_id=job_id)
    delayed = DelayedSubmission.load(paths.submitted_pickle)
    job = delayed.function
    if not isinstance(job, PretrainJob):
        return f"failed and is not a pretrain job ({type(job).__name__}): not restarted"
    spec = job.spec
    if spec.restarts >= spec.max_restarts:
        return f"failed (srun exit status {status}) with no restart left (--max-restarts {spec.max_restarts})"
    for task in range(int(os.environ.get("SLURM_NTASKS", "1"))):  # a task that finished before another failed
        JobPaths(folder, job_id=job_id, task_id=task).result_pickle.unlink(missing_ok=True)
    again = DelayedSubmission(job.restarted())
    again.set_timeout(delayed._timeout_min, delayed._timeout_countdown)
    with temporary_save_path(paths.submitted_pickle) as tmp:
        again.dump(tmp)
    # said before the requeue, which ends this script at once
    print(f"pretrain launch: job {job_id} failed (srun exit status {status}): requeued as restart "
          f"{spec.restarts + 1} of --max-restarts {spec.max_restarts}, resuming from the newest checkpoint in "
          f"{spec.run_dir}", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    return "requeued"


def main(argv: list[str]) -> int:
    folder, job_id, status = argv[0], argv[1], int(argv[2])
    print(f"pretrain launch: job {job_id} {restart_if_allowed(folder, job_id, status)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
