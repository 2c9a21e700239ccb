"""A rank killed for real (SIGKILL, through the PRETRAIN_TEST_KILL hook: pretrain/fault_injection.py) in a 2- and a
4-rank `pretrain train --nproc N` job, as a step starts (its peer then waits in the step's collectives) or while the
checkpoint is being saved (after writing its shards, before the commit): the job ends within seconds with one line
naming the killed rank and the signal, leaves no process behind and no half-written checkpoint in place, and
`--resume auto` continues from the newest complete checkpoint along the uninterrupted one-process loss curve."""

import os
import re
import subprocess
import sys
import time

import pytest

from pretrain.checkpoint import CheckpointManager
from tests.parallel.cli_runs import ROOT, overrides, train, train_metrics


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


DP2 = (2, 1, ["parallel.dp=2"])
DP4 = (4, 3, ["parallel.dp=4", "train.micro_batch_size=2"])  # rank 3 of 4


@pytest.mark.parametrize("job,where,step,resumes_from", [(DP2, "step", 5, 4), (DP2, "save", 4, 2), (DP4, "step", 3, 2)],
                         ids=["2 ranks, as a step starts", "2 ranks, during a save", "4 ranks, as a step starts"])
def test_a_killed_rank_ends_the_job_naming_it_and_resume_continues_the_curve(parallel_data, single, tmp_path, job,
                                                                            where, step, resumes_from):
    nproc, killed, layout = job
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
           *overrides(parallel_data), *layout, "train.checkpoint_every=2", "parallel.timeout_s=30",
           "--nproc", str(nproc)]
    # and every rank gets SIGTERM as it reports its error, as torchrun's stop may reach it then
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRETRAIN_TEST_KILL": f"{killed}:{step}:{where}",
           "PRETRAIN_TEST_SIGNAL": "error report"}
    started = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.time() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1 and took < 120, output[-4000:]
    # one line for the job, one for the rank that saw its peer go; no traceback
    assert f"error: the job failed: rank {killed} (pid " in result.stderr, output[-4000:]
    assert "ended by SIGKILL: killed (out of memory, or from outside the job)" in result.stderr
    # each rank that saw its peer go names it alone (torchrun may stop some before they reach the failed collective)
    waiting = [line for line in result.stderr.splitlines() if re.match(r"error: rank \d \(coordinates", line)]
    assert waiting and all(f"held up by rank {killed} (" in line for line in waiting), output[-4000:]
    assert not any(f"held up by rank {r} (" in line for line in waiting for r in range(nproc) if r != killed)
    assert "Traceback" not in output, output[-4000:]
    assert not processes_mentioning(str(run_dir))
    complete, broken = CheckpointManager(run_dir / "checkpoints").survey()
    assert [p.name for p in complete][-1] == f"step_{resumes_from:08d}" and not broken

    resumed = train(parallel_data, run_dir, *layout, nproc=nproc, resume="auto")
    want = train_metrics(single[0])
    assert sorted(resumed)[-1] == 8
    for s in range(resumes_from + 1, 9):
        assert abs(resumed[s] - want[s]["loss"]) < 2e-4, (s, resumed[s], want[s]["loss"])
