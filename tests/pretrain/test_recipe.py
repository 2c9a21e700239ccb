"""`pretrain recipe`: pretraining -> context extension -> SFT (LoRA) -> DPO on tiny sizes, stopped by SIGTERM in the
middle of the SFT phase and continued by running the same command again; DPO starts from the merged SFT model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.callbacks.metrics_log import read_metrics
from pretrain.config import ConfigError
from pretrain.recipe import check_phases, load_recipe

from .conftest import DPO, SFT, TINY_MODEL

ROOT = Path(__file__).parents[2]
COMMON = ["train.log_every=1", "train.eval_batches=1", "tracking.progress_bar=false", "train.threads=1"]


def recipe_file(tmp_path, tiny_data, tiny_chat, tiny_pairs) -> Path:
    config = str(ROOT / "configs" / "tiny.yaml")
    longer = ["model.max_seq_len=128", "model.rope.scaling=yarn", "model.rope.factor=2",
              "model.rope.original_max_seq_len=64"]
    phases = [
        {"name": "pretrain", "config": config,
         "overrides": [*TINY_MODEL, f"data.dir={tiny_data}", *COMMON, "train.steps=4", "train.checkpoint_every=4",
                       "train.eval_every=4"]},
        {"name": "long_context", "config": config,
         "overrides": [*TINY_MODEL, f"data.dir={tiny_data}", *COMMON, *longer, "data.seq_len=128",
                       "train.global_batch_size=4", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"],
         "eval_tasks": ["long_ppl", "passkey"],
         "eval_args": ["--seq-len", "128", "--lengths", "200", "--depths", "0.5", "--windows", "2",
                       "--trials", "1"]},
        {"name": "sft", "config": config,
         "overrides": [*TINY_MODEL, *SFT, *longer, f"data.dir={tiny_chat}", *COMMON, "lora.rank=4", "train.steps=20",
                       "train.checkpoint_every=20", "train.eval_every=20"],
         "eval_tasks": ["sft"], "eval_args": ["--questions", "3"]},
        {"name": "dpo", "config": config,
         "overrides": [*TINY_MODEL, *DPO, "model.rope.scaling=yarn", "model.rope.factor=4",
                       "model.rope.original_max_seq_len=64", f"data.dir={tiny_pairs}", *COMMON, "train.steps=2",
                       "train.checkpoint_every=2", "train.eval_every=2"]},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "test_recipe", "phases": phases}))
    return path


def recipe_command(path: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pretrain.cli", "recipe", str(path), "--run-dir", str(run_dir)]


def sft_steps(run_dir: Path) -> list[int]:
    return train_steps(run_dir / "sft")


def test_a_recipe_runs_every_phase_and_continues_after_a_stop(tmp_path, tiny_data, tiny_chat, tiny_pairs):
    path, run_dir = recipe_file(tmp_path, tiny_data, tiny_chat, tiny_pairs), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(recipe_command(path, run_dir), cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not sft_steps(run_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGTERM)  # as Ctrl-C or a scheduler would: the whole process group
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 75, output[-3000:]  # stopped on request, resumable
    stopped_at = max(sft_steps(run_dir))
    assert 1 <= stopped_at < 20, output[-3000:]
    assert not (run_dir / "dpo").exists()

    second = subprocess.run(recipe_command(path, run_dir), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    assert "phase pretrain already done" in out and "phase long_context already done" in out
    assert f"resumed from {run_dir / 'sft' / 'checkpoints'}" in out
    assert max(sft_steps(run_dir)) == 20
    results = {row["phase"]: row for row in json.loads((run_dir / "results.json").read_text())}
    assert list(results) == ["pretrain", "long_context", "sft", "dpo"]
    assert 0 <= results["long_context"]["passkey_accuracy"] <= 1 and results["long_context"]["long_loss"] > 0
    assert 0 <= results["sft"]["answer_f1"] <= 1
    assert 0 <= results["dpo"]["reward_accuracy"] <= 1
    assert "| dpo | 2 |" in (run_dir / "results.md").read_text()
    dpo_meta = json.loads((run_dir / "dpo" / "summary.json").read_text())
    assert dpo_meta["initialized_from"]["path"] == str(run_dir / "sft" / "merged" / "step_00000020")
    assert json.loads((run_dir / "sft" / "merged" / "step_00000020" / "meta.json").read_text())["state"][
        "merged_from"]["path"] == str((run_dir / "sft" / "checkpoints" / "step_00000020").resolve())

    from mlflow.tracking import MlflowClient  # one parent run, a child run per phase

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test_recipe")
    runs = client.search_runs([experiment.experiment_id])
    parent = (run_dir / "mlflow_run_id").read_text().strip()
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert children == {"pretrain", "long_context", "sft", "dpo"}

    # GPU-hour accounting: a ledger per phase, the stopped phase in two attempts, one cost report for the recipe
    from cluster.accounting import read_ledgers

    ledgers = {ledger.phase: ledger for ledger in read_ledgers(run_dir)}
    assert list(ledgers) == ["pretrain", "long_context", "sft", "dpo"]
    stopped, resumed = ledgers["sft"].attempts
    assert stopped.status == "stopped" and stopped.last_step == stopped_at and stopped.seconds["badput_lost"] == 0
    assert resumed.status == "finished" and resumed.first_step == stopped_at and resumed.seconds["badput_restart"] > 0
    assert all(len(ledgers[p].attempts) == 1 for p in ("pretrain", "long_context", "dpo"))
    report = (run_dir / "cost_report.md").read_text()
    assert all(f"| {phase} |" in report for phase in ledgers) and (run_dir / "cost_report.png").is_file()
    assert {"cost_report.md", "cost_report.png", "results.md"} <= {a.path for a in client.list_artifacts(parent)}
    assert "cost_report.md" in {a.path for a in client.list_artifacts(next(
        r.info.run_id for r in runs if r.info.run_name == "sft"))}


def two_phase_recipe(tmp_path, tiny_data, first_steps: int) -> Path:
    def phase(name: str, steps: int) -> dict:
        return {"name": name, "config": str(ROOT / "configs" / "tiny.yaml"),
                "overrides": [*TINY_MODEL, f"data.dir={tiny_data}", *COMMON, f"train.steps={steps}",
                              f"train.checkpoint_every={steps}", f"train.eval_every={steps}"]}

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "two_phases", "mlflow": False,
                                    "phases": [phase("first", first_steps), phase("second", 2)]}))
    return path


def train_steps(phase_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(phase_dir / "metrics.jsonl") if r["split"] == "train"]


def finish_and_check(path: Path, run_dir: Path, env: dict, first_steps: int) -> str:
    again = subprocess.run(recipe_command(path, run_dir), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert max(train_steps(run_dir / "first")) == first_steps and max(train_steps(run_dir / "second")) == 2
    return again.stdout


def test_sigterm_to_the_recipe_alone_stops_the_running_phase_and_the_recipe(tmp_path, tiny_data):
    """`kill PID` of the recipe (not of its process group): the phase running gets SIGTERM, saves and exits 75, and
    the recipe exits 75 without starting the next phase; the same command continues."""
    path, run_dir = two_phase_recipe(tmp_path, tiny_data, first_steps=400), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = subprocess.Popen(recipe_command(path, run_dir), cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not train_steps(run_dir / "first") and recipe.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recipe.poll() is None, recipe.communicate()[0][-3000:]
    os.kill(recipe.pid, signal.SIGTERM)
    output, _ = recipe.communicate(timeout=120)
    assert recipe.returncode == 75, output[-3000:]
    assert "recipe: SIGTERM received: the running step stops" in output and "recipe: stopped by SIGTERM" in output
    stopped_at = max(train_steps(run_dir / "first"))
    assert stopped_at < 400 and json.loads((run_dir / "first" / "summary.json").read_text())["stopped"] == "SIGTERM"
    assert not (run_dir / "second").exists(), output[-3000:]
    assert f"resumed from {run_dir / 'first' / 'checkpoints'}" in finish_and_check(path, run_dir, env, 400)


def test_a_signal_between_phases_stops_the_recipe_before_the_next(tmp_path, tiny_data):
    path, run_dir = two_phase_recipe(tmp_path, tiny_data, first_steps=2), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(recipe_command(path, run_dir), cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**env, "PRETRAIN_TEST_SIGNAL": "between phases"})
    assert stopped.returncode == 75, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "recipe: stopped by SIGTERM" in stopped.stdout and not (run_dir / "second").exists()
    assert "phase first already done" in finish_and_check(path, run_dir, env, 2)


def test_a_bad_phase_config_fails_before_any_phase_runs(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"phases": [
        {"name": "pretrain", "config": str(ROOT / "configs" / "tiny.yaml")},
        {"name": "sft", "config": str(ROOT / "configs" / "sft_tiny.yaml"), "overrides": ["model.n_kv_heads=3"]}]}))
    with pytest.raises(ConfigError, match=r"phases\[1\] \(sft\): model.n_kv_heads"):
        check_phases(load_recipe(path))
    path.write_text(yaml.safe_dump({"phases": [{"name": "a b", "config": "x.yaml"}]}))
    with pytest.raises(ConfigError, match="must be a word"):
        load_recipe(path)
