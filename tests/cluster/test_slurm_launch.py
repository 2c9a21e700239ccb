"""`pretrain launch` on a real SLURM (daemons started by the session fixture, tests/cluster/conftest.py) through real
submitit, with real gloo processes: a 2-task DP=2 job of the tiny model against `pretrain train --nproc 2`; a job
interrupted the way submitit preempts (SIGTERM, then USR2) that saves, requeues itself and resumes; a rank SIGKILLed
and the job restarted (`--max-restarts`), then failing fast when no restart is left; a bad config refused before
submission; the local executor; a recipe interrupted. Every run: 12 steps of 2 processes; losses compared step by
step."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.callbacks.metrics_log import read_metrics
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).parents[2]
RUN = [*TINY_MODEL, "parallel.dp=2", "parallel.timeout_s=60", "train.steps=12", "train.log_every=1",
       "train.eval_every=12", "train.eval_batches=1", "train.checkpoint_every=2", "tracking.mlflow=false",
       "tracking.progress_bar=false"]
SAME_LOSS = 1e-6  # the same 2 ranks, the same data and reduction order: the curves agree to float rounding
SLOW_RANK_0 = {"PRETRAIN_TEST_SLOW": "0:0.3"}  # 0.3 s more per step: time to interrupt mid-run (losses unchanged)


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


def launch_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["launch", "configs/tiny.yaml", "--run-dir", str(run_dir), "--tasks-per-node", "2", "--time", "10",
            *RUN, f"data.dir={data}", *extra]


def start_launch(run_dir: Path, data: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain.cli", *launch_args(run_dir, data, "--wait", *extra)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def assert_same_curve(run_dir: Path, reference: dict[int, float]) -> None:
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 13)), sorted(got)
    assert all(abs(got[s] - reference[s]) <= SAME_LOSS for s in got), (got, reference)


def job_id_of(run_dir: Path, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "slurm").is_dir():
            ids = [p.name for p in (run_dir / "slurm").iterdir() if p.name.isdigit()]
            if ids:
                return ids[0]
        time.sleep(0.1)
    raise AssertionError(f"no job folder in {run_dir / 'slurm'}")


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {step}")


def state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def task_pid(job_id: str, rank: int) -> int:
    """The pid of the job's task `rank` in its (first) srun step, as SLURM lists it."""
    out = subprocess.run(["scontrol", "listpids", f"{job_id}.0"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        pid, _, _, _, global_id = line.split()
        if global_id == str(rank):
            return int(pid)
    raise AssertionError(f"no task {rank} in job {job_id}:\n{out}")


def logs(run_dir: Path, job_id: str) -> str:
    folder = run_dir / "slurm" / job_id
    return "\n".join(path.read_text() for path in sorted(folder.glob("*_log.*")))


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[int, float]:
    """The same run through `pretrain train --nproc 2` (torchrun)."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    result = cli("train", "configs/tiny.yaml", "--run-dir", str(run_dir), "--nproc", "2", *RUN,
                 f"data.dir={tiny_data}")
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run_dir)


def test_a_two_task_job_trains_like_torchrun_and_submits_the_dry_run_script(local_slurm, tiny_data, reference,
                                                                            tmp_path):
    run_dir = tmp_path / "run"
    dry = cli(*launch_args(run_dir, tiny_data, "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    started = time.time()
    result = cli(*launch_args(run_dir, tiny_data, "--wait"))
    took = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished: 12 steps" in result.stdout
    assert_same_curve(run_dir, reference)
    job_id = job_id_of(run_dir)
    submitted = (run_dir / "slurm" / job_id / f"{job_id}_submission.sh").read_text()
    assert submitted.strip() == dry.stdout.split("(what submitit would submit):\n", 1)[1].strip()
    print(f"measured: a 2-task job of 12 steps, submission to result: {took:.1f} s")


def test_an_interrupted_job_saves_requeues_and_resumes_on_the_same_curve(local_slurm, tiny_data, reference,
                                                                         tmp_path):
    """submitit's preemption (`job._interrupt()`: SIGTERM then USR2 to every process of the job) mid-run: every rank
    stops after the same step, the checkpoint is saved, the first task requeues the job through submitit's
    checkpointable path and the requeued job continues from it, in the same run folder and the same MLflow run."""
    import submitit
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    proc = start_launch(run_dir, tiny_data, "tracking.mlflow=true", env=SLOW_RANK_0)
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, 3)
    interrupted = time.time()
    submitit.SlurmExecutor.job_class(folder=run_dir / "slurm" / "%j", job_id=job_id)._interrupt()
    times, left_at, seen = {}, None, "RUNNING"
    while proc.poll() is None and time.time() - interrupted < 240:
        now, current = time.time(), state(job_id)
        if current != seen and seen == "RUNNING":
            times.setdefault("left RUNNING", now - interrupted)
            left_at = max(losses(run_dir))
        if current == "RUNNING" and seen != "RUNNING":
            times.setdefault("RUNNING again", now - interrupted)
        if left_at is not None and max(losses(run_dir)) > left_at:
            times.setdefault("first resumed step", now - interrupted)
        seen = current
        time.sleep(0.1)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "finished: 12 steps" in output, output[-3000:]
    text = logs(run_dir, job_id)
    stop = re.search(r"stopped by SIG(TERM|USR2) after step (\d+)", text)  # the first of the two to arrive
    assert stop and 3 <= int(stop[2]) < 12, text[-3000:]  # mid-run
    stopped = int(stop[2])
    assert "requeueing the job through submitit" in text and f"Requeued job {job_id}" in text
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in text
    assert_same_curve(run_dir, reference)
    # one MLflow run, continued: every step's loss in it
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 13))
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    # the run now has a measured checkpoint save: the next launch's signal lead is derived from it
    from cluster.signal_lead import signal_lead

    assert "derived from" in signal_lead(run_dir).reason
    print("measured: requeue cycle after the interrupt: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


def test_a_killed_rank_restarts_the_job_until_no_restart_is_left_then_it_fails_fast(local_slurm, tiny_data,
                                                                                      reference, tmp_path):
    """`--max-restarts 1`: rank 1 SIGKILLed mid-run, the job restarts from the newest checkpoint and continues the
    curve; then rank 0 killed in the restarted attempt, and the job fails at once, naming the error."""
    from pretrain.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    proc = start_launch(run_dir, tiny_data, "--max-restarts", "1", env=SLOW_RANK_0)
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, 3)
    first_attempt = len(records(run_dir))
    os.kill(task_pid(job_id, 1), signal.SIGKILL)
    deadline = time.time() + 120
    while not ("resumed from" in logs(run_dir, job_id) and len(records(run_dir)) >= first_attempt + 2):
        assert time.time() < deadline and proc.poll() is None, logs(run_dir, job_id)[-3000:]
        time.sleep(0.1)
    killed = time.time()
    os.kill(task_pid(job_id, 0), signal.SIGKILL)  # the first task: its peer reports the failure
    output = proc.communicate(timeout=240)[0]
    took = time.time() - killed
    assert proc.returncode == 1, output[-3000:]
    assert "task 1 failed: cluster.job.RestartsExhausted: the job failed" in output, output[-3000:]
    assert "after 1 restart(s), --max-restarts 1" in output and took < 60
    text = logs(run_dir, job_id)
    assert "requeued as restart 1 of --max-restarts 1" in text
    assert "attempt 2 (restarts after a failure: 1 of 1)" in text
    assert "with no restart left (--max-restarts 1)" in text
    got = losses(run_dir)  # the log keeps one record a step: the restarted attempt's after its checkpoint
    assert sorted(got) == list(range(1, max(got) + 1)) and max(got) >= 4, got
    assert all(abs(got[s] - reference[s]) <= SAME_LOSS for s in got), (got, reference)
    complete, broken = CheckpointManager(run_dir / "checkpoints").survey()
    assert complete and not broken
    print(f"measured: kill to the failed job's report {took:.1f} s")


def test_a_bad_config_is_refused_before_anything_is_submitted(local_slurm, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = cli(*launch_args(run_dir, tiny_data, "model.n_kv_heads=3"))
    assert result.returncode == 2 and "config error at 'model.n_kv_heads'" in result.stderr, result.stderr
    result = cli(*launch_args(run_dir, tiny_data, "--nodes", "2"))  # 4 processes for DP=2
    assert result.returncode == 2 and "config error at 'parallel'" in result.stderr, result.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not run_dir.exists()


def test_the_local_executor_runs_the_same_job_and_restarts_it(tiny_data, reference, tmp_path):
    """`--executor local`: `pretrain train --nproc 2` here, on the same curve; rank 1 killed as step 3 starts in
    every attempt (PRETRAIN_TEST_KILL), so: one restart from the newest checkpoint, then the named failure."""
    run_dir = tmp_path / "run"
    result = cli("launch", "configs/tiny.yaml", "--executor", "local", "--run-dir", str(run_dir), "--tasks-per-node",
                 "2", "--max-restarts", "1", *RUN, f"data.dir={tiny_data}", env={"PRETRAIN_TEST_KILL": "1:3:step"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"runs here: pretrain train {ROOT}/configs/tiny.yaml --run-dir {run_dir}" in result.stdout
    assert "restart 1 of --max-restarts 1 from the newest checkpoint" in result.stdout
    assert "resumed from" in result.stdout and "rank 1 (pid" in result.stderr
    assert "error: the job failed (exit code 1) after 1 restart(s), --max-restarts 1" in result.stdout
    got = losses(run_dir)
    assert sorted(got) == [1, 2] and all(abs(got[s] - reference[s]) <= SAME_LOSS for s in got), got


def test_an_interrupted_recipe_requeues_and_its_phase_resumes(local_slurm, tiny_data, reference, tmp_path):
    """A recipe is one task that starts each phase's processes (torchrun) inside the allocation; the scheduler's
    signals reach all of them: the phase saves and exits 75, the recipe passes that on and its task requeues."""
    import submitit

    recipe = tmp_path / "recipe.yaml"
    phase = {"name": "first", "config": str(ROOT / "configs/tiny.yaml"), "nproc": 2,
             "overrides": [*RUN, f"data.dir={tiny_data}"]}
    recipe.write_text(json.dumps({"name": "launch_test", "mlflow": False, "phases": [phase]}))  # JSON is YAML
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "launch", str(recipe), "--run-dir", str(run_dir),
                             "--time", "10", "--wait"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **SLOW_RANK_0})
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir / "first", 3)
    submitit.SlurmExecutor.job_class(folder=run_dir / "slurm" / "%j", job_id=job_id)._interrupt()
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0 and "finished: first (12 steps)" in output, output[-3000:]
    text = logs(run_dir, job_id)
    assert re.search(r"stopped by SIG(TERM|USR2) after step \d+ of 12", text) and f"Requeued job {job_id}" in text
    assert "attempt 2" in text and "resumed from" in text
    assert_same_curve(run_dir / "first", reference)
