"""Bad layouts fail before any process starts; a stuck rank fails the job within the timeout, named."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.parallel.cli_runs import ROOT, overrides


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_sizes_not_matching_nproc_fail_before_launch(parallel_data, tmp_path):
    result = cli("--run-dir", str(tmp_path / "r"), *overrides(parallel_data), "parallel.tp=2", "--nproc", "3")
    assert result.returncode == 2
    assert "3 were launched" in result.stderr and "torch.distributed" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_tp_not_dividing_the_model_is_a_config_error(parallel_data, tmp_path):
    result = cli("--run-dir", str(tmp_path / "r"), *overrides(parallel_data), "parallel.tp=3", "--nproc", "3")
    assert result.returncode == 2 and "model.n_heads" in result.stderr and "parallel.tp=3" in result.stderr


def test_window_not_splitting_over_context_parallel_ranks_fails_before_launch(parallel_data, tmp_path):
    result = cli("--run-dir", str(tmp_path / "r"), *overrides(parallel_data), "parallel.cp=3", "--nproc", "3")
    assert result.returncode == 2 and "data.seq_len" in result.stderr and "2 x parallel.cp = 6" in result.stderr
    assert "torch.distributed" not in result.stderr and not (tmp_path / "r").exists()


def test_more_pipeline_stages_than_layers_fails_before_launch(parallel_data, tmp_path):
    result = cli("--run-dir", str(tmp_path / "r"), *overrides(parallel_data), "model.n_layers=2", "parallel.pp=4",
                 "--nproc", "4")
    assert result.returncode == 2 and "parallel.pp" in result.stderr and "model.n_layers=2" in result.stderr
    assert "torch.distributed" not in result.stderr and not (tmp_path / "r").exists()


STUCK_RANK = textwrap.dedent(
    """
    import os, signal, sys, time
    from pretrain.callbacks.base import Callback
    from pretrain import cli
    from pretrain.callbacks import default_callbacks as real_callbacks
    import pretrain.callbacks as callbacks_module

    class Stall(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.grid.rank == 1 and trainer.step == 2:
                if os.environ.get("STALL") == "sigstop":  # the whole process stops, its watchdog thread too
                    os.kill(os.getpid(), signal.SIGSTOP)
                time.sleep(120)

    def with_stall(cfg, run_dir, main_rank=True):
        return [Stall(), *real_callbacks(cfg, run_dir, main_rank)]

    callbacks_module.default_callbacks = with_stall
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("stall", ["sleep", "sigstop"])
def test_stuck_rank_fails_within_timeout_naming_rank_and_phase(parallel_data, tmp_path, stall):
    """Rank 1 stalls in a callback after step 2 (sleeping, or stopped whole by SIGSTOP): rank 0's collective times
    out and its error names rank 1 and where it was (from the heartbeats in the rendezvous store); a sleeping rank's
    watchdog also says where it is stuck, a stopped one can say nothing and is named by its last step's start."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "STALL": stall}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           "train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"), *overrides(parallel_data),
           "parallel.dp=2", "parallel.timeout_s=5"]
    start = time.time()
    with open(tmp_path / "stdout", "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        err = []
        try:  # read until rank 0's error: torchrun would then wait ~30 s for a stopped rank to take its SIGTERM
            for line in proc.stderr:
                err.append(line)
                if "error: rank 0 (coordinates" in line or time.time() - start > 150:
                    break
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            subprocess.run(["pkill", "-KILL", "-f", str(script)], check=False)  # the ranks: in their own groups
    took = time.time() - start
    assert took < 100, f"took {took:.0f} s: the stuck collective was not cut by parallel.timeout_s"
    output = (tmp_path / "stdout").read_text() + "".join(err)
    assert "error: rank 0 (coordinates" in output and "Traceback" not in output, output[-3000:]
    assert "stop check at step 2" in output and "parallel.timeout_s=5" in output
    # the waiting rank names the one that held it up, and where
    where = "on_step_end callbacks" if stall == "sleep" else "step start"
    assert f"held up by rank 1 (step 2, {where}, last heard" in output, output[-3000:]
    if stall == "sleep":  # the stuck rank's watchdog says so itself
        assert "rank 1: no progress for" in output and "in phase 'on_step_end callbacks' at step 2" in output


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step_with_a_checkpoint(parallel_data, tmp_path):
    """`pretrain train --nproc 2` gets SIGTERM: torchrun passes one stop request to both ranks, they agree on the
    step, save a checkpoint and the launcher exits with the resumable code."""
    from pretrain.checkpoint import read_meta
    from pretrain.stop import EXIT_RESUMABLE
    from tests.parallel.cli_runs import train_metrics

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
           *overrides(parallel_data), "train.steps=2000", "train.checkpoint_every=10000", "parallel.dp=2",
           "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and train_metrics(run_dir)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_RESUMABLE, err[-3000:]
    stopped_at = max(train_metrics(run_dir))
    assert 0 < stopped_at < 2000 and "stopped by SIGTERM" in out
    meta = read_meta(run_dir / "checkpoints" / f"step_{stopped_at:08d}")
    assert meta.step == stopped_at and meta.layout["world_size"] == 2
