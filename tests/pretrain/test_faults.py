"""Faults injected for real into single-process runs: unusable checkpoints on resume, NaN gradients, NaN weights
at save time. Nothing a run has saved is lost, and nothing non-finite is saved."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.callbacks import default_callbacks
from pretrain.checkpoint import CheckpointError, load_checkpoint, read_meta
from pretrain.config import load_config
from pretrain.stop import EXIT_RESUMABLE
from pretrain.trainer import Trainer

from .test_train_e2e import train_losses

RUN = ["train.steps=4", "train.log_every=1", "train.eval_every=100", "train.eval_batches=1",
       "train.checkpoint_every=2", "train.keep_last=3", "tracking.mlflow=false", "tracking.progress_bar=false"]


def trainer_for(overrides, run_dir):
    cfg = load_config(None, overrides)
    return Trainer(cfg, run_dir, default_callbacks(cfg, run_dir))


def flip_a_byte(checkpoint):
    (shard,) = (checkpoint / "shards").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, tiny_data):
    from .conftest import TINY_MODEL

    run_dir = tmp_path_factory.mktemp("four_steps")
    overrides = [*TINY_MODEL, f"data.dir={tiny_data}", *RUN]
    trainer_for(overrides, run_dir).fit()
    return overrides, run_dir


def test_resume_auto_refuses_when_every_checkpoint_is_unusable(four_steps, tmp_path):
    overrides, source = four_steps
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_00000004" / "meta.json").unlink()
    flip_a_byte(checkpoints / "step_00000002")
    with pytest.raises(CheckpointError) as error:
        trainer_for([*overrides, "train.steps=6"], run_dir).fit(resume="auto")
    message = str(error.value)
    assert "no usable checkpoint" in message and "step_00000004" in message and "meta.json is missing" in message
    assert "step_00000002" in message and "is corrupt" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]  # nothing moved


def test_resume_auto_falls_back_and_moves_the_corrupt_checkpoint_aside(four_steps, tmp_path, capsys):
    overrides, source = four_steps
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    flip_a_byte(run_dir / "checkpoints" / "step_00000004")
    summary = trainer_for([*overrides, "train.steps=6"], run_dir).fit(resume="auto")
    assert "resumed from" in capsys.readouterr().out
    assert summary["steps"] == 6
    assert (run_dir / "checkpoints" / "invalid" / "step_00000004").is_dir()
    assert train_losses(run_dir)[3] == train_losses(source)[3]  # steps 3-4 ran again from step 2's checkpoint


def poison_step(trainer, step):
    """The backward of `step` gets a NaN loss, so its gradients are NaN."""
    backward = trainer.engine.backward

    def poisoned(loss, accum):
        backward(loss * float("nan") if trainer.step + 1 == step else loss, accum)

    trainer.engine.backward = poisoned


def finite(checkpoint, overrides):
    model = load_config(None, overrides).model.build()
    load_checkpoint(checkpoint, model, restore_rng_state=False)
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_gradients_stop_the_run_before_the_weights_change(four_steps, tmp_path):
    overrides, _ = four_steps
    trainer = trainer_for(overrides, tmp_path / "run")
    poison_step(trainer, 3)
    with pytest.raises(FloatingPointError, match="step 3: the gradient norm is nan; the step was not applied"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    newest = trainer.checkpoints.latest_valid()
    assert newest.name == "step_00000002" and finite(newest, overrides)


def test_nan_gradients_can_be_skipped(four_steps, tmp_path):
    overrides, source = four_steps
    trainer = trainer_for([*overrides, "train.on_nan=skip"], tmp_path / "run")
    poison_step(trainer, 3)
    summary = trainer.fit()
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    assert read_meta(tmp_path / "run" / "checkpoints" / "step_00000004").state["skipped_steps"] == 1
    assert finite(tmp_path / "run" / "checkpoints" / "step_00000004", overrides)
    assert train_losses(tmp_path / "run")[2] == train_losses(source)[2]


def poison_once(trainer, step):
    """Only the first time `step` runs does its backward get a NaN loss."""
    backward, done = trainer.engine.backward, []

    def poisoned(loss, accum):
        bad = trainer.step + 1 == step and not done
        done.extend([True] if bad else [])
        backward(loss * float("nan") if bad else loss, accum)

    trainer.engine.backward = poisoned


def test_nan_gradients_roll_back_to_the_last_checkpoint(four_steps, tmp_path, capsys):
    """Step 3's gradients are NaN: back to step 2's checkpoint, the data going on, so steps 3 and 4 train on the
    windows after the bad one (DeepSpeed: in the next test)."""
    overrides, source = four_steps
    trainer = trainer_for([*overrides, "train.on_nan=rollback"], tmp_path / "run")
    poison_once(trainer, 3)
    summary = trainer.fit()
    assert "rolled back to the checkpoint of step 2" in capsys.readouterr().out
    assert summary["steps"] == 4 and summary["rollbacks"] == [{"at_step": 3, "to_step": 2}]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert read_meta(checkpoint).state["rollbacks"] == [{"at_step": 3, "to_step": 2}] and finite(checkpoint, overrides)
    losses, reference = train_losses(tmp_path / "run"), train_losses(source)
    assert sorted(losses) == [1, 2, 3, 4] and losses[2] == pytest.approx(reference[2], abs=1e-5)
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses[3] - reference[3]) > 1e-4  # step 3 ran again, on the next windows


@pytest.mark.parametrize("engine", [[], ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]],
                         ids=["plain", "deepspeed zero2"])
def test_rollback_restores_the_checkpoints_weights(four_steps, tmp_path, engine):
    """NaN at step 4 after step 3 changed the weights: the weights the next step starts from are step 2's
    checkpoint's exactly (the module's own parameters, which DeepSpeed computes with, not only its masters)."""
    overrides, _ = four_steps
    trainer = trainer_for([*overrides, *engine, "train.on_nan=rollback"], tmp_path / "run")
    poison_once(trainer, 4)
    roll_back, after = trainer._roll_back, {}

    def recording(where):
        roll_back(where)
        after.update({name: p.detach().clone() for name, p in trainer.model.named_parameters()})

    trainer._roll_back = recording
    assert trainer.fit()["rollbacks"] == [{"at_step": 4, "to_step": 2}]
    saved = load_config(None, overrides).model.build()
    load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002", saved, restore_rng_state=False)
    moved = 0.0
    for name, p in saved.named_parameters():
        assert torch.equal(after[name], p), name
        moved = max(moved, (trainer.model.get_parameter(name).detach() - p).abs().max().item())
    assert moved > 1e-4  # and the run went on training from there


def test_rollback_without_a_checkpoint_or_beyond_the_limit_stops(four_steps, tmp_path):
    overrides, _ = four_steps
    trainer = trainer_for([*overrides, "train.on_nan=rollback", "train.checkpoint_every=100"], tmp_path / "none")
    poison_once(trainer, 1)
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to yet"):
        trainer.fit()
    trainer = trainer_for([*overrides, "train.on_nan=rollback", "train.max_rollbacks=0"], tmp_path / "limit")
    poison_once(trainer, 3)
    with pytest.raises(FloatingPointError, match="after 0 rollbacks"):
        trainer.fit()


def test_non_finite_weights_are_never_saved(four_steps, tmp_path):
    overrides, _ = four_steps
    trainer = trainer_for(overrides, tmp_path / "run")
    trainer.train_step()
    with torch.no_grad():
        trainer.model.layers[0].attn.q_proj.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="not saving step 1: 1 weight tensor.*layers.0.attn.q_proj.weight"):
        trainer.save_checkpoint()
    assert not (tmp_path / "run" / "checkpoints").exists() or not trainer.checkpoints.checkpoints()


def start_and_signal(cmd, run_dir, sig, after_steps=3):
    """Start a training command in its own process group, and once it has logged `after_steps` steps send `sig`
    to the whole group, as Ctrl-C in a terminal does (the data-loader workers get it too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
        time.sleep(0.05)
    while time.time() < deadline and len(train_losses(run_dir)) < after_steps:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(four_steps, tmp_path, sig):
    overrides, _ = four_steps
    long_run = [*overrides, "train.steps=40", "train.checkpoint_every=1000", "data.num_workers=1"]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir), *long_run]
    code, out, err = start_and_signal(cmd, run_dir, sig)
    assert code == EXIT_RESUMABLE, err[-2000:]
    stopped_at = max(train_losses(run_dir))
    assert stopped_at < 40, "the run ended before the signal: make it longer"
    assert f"stopped by {sig.name} after step {stopped_at} of 40" in out
    assert read_meta(run_dir / "checkpoints" / f"step_{stopped_at:08d}").step == stopped_at
    if sig != signal.SIGTERM:
        return
    resumed = subprocess.run([*cmd, "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = tmp_path / "reference"
    trainer_for(long_run, reference).fit()
    expected, got = train_losses(reference), train_losses(run_dir)
    assert sorted(got) == list(range(1, 41))
    for step in range(stopped_at + 1, 41):
        assert got[step] == expected[step], step


def test_a_signal_during_start_up_stops_before_the_first_step_and_resumes_exactly(four_steps, tmp_path):
    """SIGTERM once the trainer and its data loader are built, before the first step (PRETRAIN_TEST_SIGNAL=setup):
    no step is taken, a step-0 checkpoint is saved, the command exits resumable, and the resumed run's losses are
    the uninterrupted run's."""
    overrides, _ = four_steps
    run = [*overrides, "train.steps=4", "data.num_workers=1"]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir), *run]
    stopped = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PRETRAIN_TEST_SIGNAL": "setup"})
    assert stopped.returncode == EXIT_RESUMABLE, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 0 of 4" in stopped.stdout and not train_losses(run_dir)
    assert read_meta(run_dir / "checkpoints" / "step_00000000").step == 0
    resumed = subprocess.run([*cmd, "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trainer_for(run, tmp_path / "reference").fit()
    assert train_losses(run_dir) == train_losses(tmp_path / "reference")


def test_a_signal_during_evaluation_cuts_it_short_and_saves(four_steps, tmp_path):
    """SIGTERM as the evaluation after step 2 starts (PRETRAIN_TEST_SIGNAL=evaluation:2), an evaluation of 400
    batches: it stops at its next check (every 8 batches) instead of finishing, records no validation loss, and the
    run saves step 2 and exits resumable."""
    from pretrain.callbacks.metrics_log import read_metrics

    overrides, _ = four_steps
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir), *overrides,
           "train.steps=40", "train.eval_every=2", "train.eval_batches=400", "train.checkpoint_every=1000"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PRETRAIN_TEST_SIGNAL": "evaluation:2"})
    assert result.returncode == EXIT_RESUMABLE, result.stderr[-2000:]
    assert "evaluation at step 2 cut short by the stop request" in result.stdout
    assert "stopped by SIGTERM after step 2 of 40" in result.stdout
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "val"]
    assert read_meta(run_dir / "checkpoints" / "step_00000002").step == 2


def test_a_save_past_a_file_size_limit_fails_cleanly_and_the_run_resumes(four_steps, tmp_path):
    """The disk "fills" during a save (a file-size limit set on the running process, as a full disk's ENOSPC
    would): the run stops with the path, the errno and the newest intact checkpoint named, the partial folder is
    removed, and `--resume auto` (limit gone) continues from the checkpoint before."""
    import resource

    overrides, _ = four_steps
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
           *overrides, "train.steps=2000", "train.checkpoint_every=3", "train.eval_every=10000"]

    def ignore_file_size_signal():  # then a write past the limit fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_file_size_signal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step_00000003").is_dir() and time.time() < deadline:
        time.sleep(0.02)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))  # below one checkpoint's shard file
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "failed: rank 0: [Errno 27] File too large (is the disk full" in err
    assert "the newest checkpoint is still step_00000003" in err and "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003"]
    resumed = subprocess.run([*cmd[:-3], "train.steps=5", "train.checkpoint_every=3", "--resume", "auto"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and sorted(train_losses(run_dir))[-1] == 5


def test_resume_refuses_other_data_unless_allowed(four_steps, tmp_path, tiny_data, capsys):
    from data.prepare import prepare_dataset

    overrides, source = four_steps
    same_tokenizer = tmp_path / "other"
    prepare_dataset(same_tokenizer, sources=["passkey:300:300"], val_fraction=0.05, shard_tokens=20_000,
                    tokenizer=tiny_data / "tokenizer.json")
    other_tokenizer = tmp_path / "retokenized"
    prepare_dataset(other_tokenizer, sources=["passkey:300:300"], vocab_size=300, val_fraction=0.05)
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    more = [*overrides, "train.steps=6"]
    with pytest.raises(CheckpointError, match="was trained on other data .* train.allow_data_change"):
        trainer_for([*more, f"data.dir={same_tokenizer}"], run_dir).fit(resume="auto")
    with pytest.raises(CheckpointError, match="was trained with the tokenizer"):
        trainer_for([*more, f"data.dir={other_tokenizer}", "train.allow_data_change=true"], run_dir).fit(
            resume="auto")
    summary = trainer_for([*more, f"data.dir={same_tokenizer}", "train.allow_data_change=true"], run_dir).fit(
        resume="auto")
    assert summary["steps"] == 6 and "continuing (train.allow_data_change)" in capsys.readouterr().out
    state = read_meta(run_dir / "checkpoints" / "step_00000006").state
    assert state["data"][0]["dir"] == str(same_tokenizer) and state["skipped_shards"] == []


def test_an_unusable_run_folder_is_refused_before_anything_is_built(four_steps, tmp_path, capsys):
    from pretrain.cli import main

    overrides, _ = four_steps
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for run_dir in (blocker, blocker / "below"):
        assert main(["train", "configs/tiny.yaml", "--run-dir", str(run_dir), *overrides]) == 2
        err = capsys.readouterr().err
        assert "--run-dir" in err and "cannot be used as the run folder" in err


def test_preparing_a_single_document_is_an_error_not_an_empty_training_split(tmp_path, capsys):
    from pretrain.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("one small document, the whole file")
    assert main(["data", "prepare", "--out", str(tmp_path / "out"), "--source", str(text)]) == 1
    assert "no training documents" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
