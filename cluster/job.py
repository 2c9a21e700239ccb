"""What every task of a `pretrain launch --executor slurm` job runs under submitit: the same entry point as
`pretrain train` (one task per process; rank and world from srun's SLURM_* variables, the rendezvous on the job's
first node: cluster/distributed.py) or `pretrain recipe` (one task, each phase starts its own processes), and what
happens when an attempt ends early:

- **Stopped** by a signal (SLURM's warning before the time limit or a preemption — USR2 under submitit — or SIGTERM,
  SIGUSR1): every rank finishes the same step and the checkpoint is saved (pretrain/stop.py). Then the first task
  requeues the job through submitit's checkpointable path: its handler calls `__submitit_checkpoint__` (the same
  job with `--resume auto`), stores it as the job's submission and runs `scontrol requeue`. The requeued job
  resumes from the checkpoint in the same run folder, so it also continues the same MLflow run.
- **Failed** (a rank crashed or died; its peers fail within seconds): with restarts left (`--max-restarts`) every
  task exits without a result and the batch script's last line (cluster/restart.py) requeues the job with
  `--resume auto`; with none left the job fails with RestartsExhausted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission, JobPaths

from pretrain.stop import EXIT_RESUMABLE, StopRequest

# Set by torchrun for its workers: a job submitted from inside one would otherwise take them for its own layout.
LEAKED_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                             "TORCHELASTIC_RUN_ID")


class RestartsExhausted(RuntimeError):
    """The job failed again and `--max-restarts` allows no further restart."""


@dataclass(frozen=True)
class JobSpec:
    """One `pretrain train` or `pretrain recipe` command, and how often a failed attempt was restarted so far."""

    command: str  # "train" or "recipe"
    config: str
    run_dir: str
    overrides: tuple[str, ...] = ()
    resume: str | None = None
    max_restarts: int = 0
    restarts: int = 0

    def argv(self) -> list[str]:
        if self.command == "recipe":
            return ["recipe", self.config, "--run-dir", self.run_dir]
        resume = ["--resume", self.resume] if self.resume else []
        return ["train", self.config, "--run-dir", self.run_dir, *resume, *self.overrides]


def requeue_marker(folder: str | Path, job_id: str) -> Path:
    """Written by the first task before it requeues a stopped job, so that the batch script's restart step leaves
    that attempt alone. One per attempt (SLURM_RESTART_COUNT counts every requeue)."""
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    return JobPaths(folder, job_id=job_id).folder / f"{job_id}_requeued_{attempt}"


class PretrainJob(submitit.helpers.Checkpointable):
    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __submitit_checkpoint__(self) -> DelayedSubmission:
        """Called by submitit (first task only) when the stopped job requeues itself: the same job, resumed."""
        return DelayedSubmission(PretrainJob(replace(self.spec, resume="auto")))

    def restarted(self) -> PretrainJob:
        """The job to run after a failed attempt (cluster/restart.py)."""
        return PretrainJob(replace(self.spec, resume="auto", restarts=self.spec.restarts + 1))

    def __call__(self) -> Any:
        for name in LEAKED_LAUNCHER_VARIABLES:
            os.environ.pop(name, None)
        env = submitit.JobEnvironment()
        spec = self.spec
        print(f"pretrain launch: task {env.global_rank} of {env.num_tasks} on {env.hostname}, job {env.job_id}, "
              f"attempt {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1} (restarts after a failure: "
              f"{spec.restarts} of {spec.max_restarts}): pretrain {' '.join(spec.argv())}", flush=True)
        outcome, detail = self._run_recipe() if spec.command == "recipe" else self._run_train()
        if outcome == "done":
            return detail
        if outcome == "stopped":
            self._requeue(env)
        self._restart_or_fail(env.global_rank, str(detail))

    def _run_train(self) -> tuple[str, Any]:
        from pretrain.cli import main

        try:
            code = main(self.spec.argv())
        except Exception:
            traceback.print_exc()
            return "failed", "an exception, its traceback is above"
        if code not in (0, EXIT_RESUMABLE):
            return "failed", f"exit code {code}, its error is above"
        try:  # main() returned past a barrier on every rank: rank 0 has written the summary (a stopped run says so)
            summary = json.loads((Path(self.spec.run_dir) / "summary.json").read_text())
        except Exception as exc:
            return "failed", f"after training: {exc}"
        return ("stopped" if summary.get("stopped") else "done"), summary

    def _run_recipe(self) -> tuple[str, Any]:
        from pretrain.cli import main

        # While a phase runs it gets the scheduler's signal itself (it reaches every process of the job step),
        # saves and exits 75, which the recipe passes on; between phases the recipe stops before the next one and
        # exits 75 (pretrain/recipe.py). Here the signal is only recorded, instead of submitit requeueing at once.
        with StopRequest(announce=False):
            try:
                code = main(self.spec.argv())
            except SystemExit as exc:
                code = exc.code
            except Exception:
                traceback.print_exc()
                return "failed", "an exception, its traceback is above"
        if code == EXIT_RESUMABLE:
            return "stopped", None
        if code != 0:
            return "failed", f"exit code {code}, its error is above"
        return "done", json.loads((Path(self.spec.run_dir) / "results.json").read_text())

    def _requeue(self, env: submitit.JobEnvironment) -> None:
        if env.global_rank != 0:  # only the first task's checkpoint runs; the requeue ends this one
            print(f"task {env.global_rank}: stopped and saved; task 0 requeues the job", flush=True)
            sys.exit(0)
        folder = os.environ["SUBMITIT_FOLDER"]
        requeue_marker(folder, env.job_id).touch()
        warning = env._usr_sig()
        handler = signal.getsignal(warning)
        if type(getattr(handler, "__self__", None)).__name__ != "SignalHandler":
            raise RuntimeError(f"no submitit handler for {signal.Signals(warning).name}: not run by submitit's "
                               "SLURM executor, so the job cannot requeue itself")
        print("stopped and saved: requeueing the job through submitit (it resumes with --resume auto)", flush=True)
        signal.raise_signal(warning)  # submitit: __submitit_checkpoint__, scontrol requeue, exit
        raise RuntimeError("submitit's handler returned without requeueing the job")

    def _restart_or_fail(self, rank: int, why: str) -> None:
        spec = self.spec
        if spec.restarts < spec.max_restarts:
            print(f"task {rank}: this attempt failed ({why}); the job restarts from the newest checkpoint in "
                  f"{spec.run_dir} (restart {spec.restarts + 1} of --max-restarts {spec.max_restarts})",
                  file=sys.stderr, flush=True)
            sys.exit(1)  # no result: the batch script's restart step (cluster/restart.py) requeues the job
        raise RestartsExhausted(
            f"the job failed ({why}, task {rank}) after {spec.restarts} restart(s), --max-restarts "
            f"{spec.max_restarts}; `pretrain launch ... --resume auto` continues from the newest checkpoint in "
            f"{spec.run_dir}/checkpoints")
