"""The whole single-process path: real shards → model → run folder, resume, tracking, CLI errors."""

import json
import subprocess
import sys

import pytest

from pretrain.callbacks import default_callbacks
from pretrain.callbacks.base import Callback
from pretrain.callbacks.metrics_log import read_metrics
from pretrain.config import load_config
from pretrain.trainer import Trainer


class StopAfter(Callback):
    """Simulates a crash: raises once the run has passed `step` (after that step's checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.step == self.step + 1:
            raise KeyboardInterrupt("simulated crash")


def run(overrides, run_dir, resume=None, extra_callbacks=()):
    cfg = load_config(None, overrides)
    callbacks = default_callbacks(cfg, run_dir)
    callbacks[-1:-1] = list(extra_callbacks)
    return Trainer(cfg, run_dir, callbacks).fit(resume=resume)


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}


COMMON = ["train.steps=12", "train.log_every=1", "train.eval_every=6", "train.eval_batches=2",
          "train.checkpoint_every=4", "tracking.mlflow=false"]


def test_resume_reproduces_uninterrupted_loss_curve(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *COMMON]
    full = tmp_path / "full"
    run(overrides, full)
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(overrides, crashed, extra_callbacks=[StopAfter(8)])
    assert max(train_losses(crashed)) == 9  # the crash came after step 9 was logged
    summary = run(overrides, crashed, resume="auto")

    expected, got = train_losses(full), train_losses(crashed)
    assert sorted(got) == list(range(1, 13))  # metrics after the checkpoint were rewritten, not duplicated
    for step in range(9, 13):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    assert summary["steps"] == 12
    assert summary["tokens"] == 12 * 8 * 64


def test_run_folder_contents(tiny_overrides, tmp_path):
    summary = run([*tiny_overrides, *COMMON], tmp_path / "r")
    r = tmp_path / "r"
    assert load_config(r / "config.yaml").train.steps == 12
    saved = json.loads((r / "summary.json").read_text())
    assert saved.keys() == summary.keys()
    for key, value in summary.items():
        assert saved[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    for key in ("steps", "tokens", "final_train_loss", "val_loss", "wall_seconds", "tokens_per_s", "mfu"):
        assert saved[key] is not None, key
    assert 0 < saved["mfu"] < 1
    records = read_metrics(r / "metrics.jsonl")
    assert [x["step"] for x in records if x["split"] == "train"] == list(range(1, 13))
    assert [x["step"] for x in records if x["split"] == "val"] == [6, 12]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[0])
    assert [p.name for p in sorted((r / "checkpoints").iterdir())] == ["step_00000008", "step_00000012"]
    assert "| **total** |" in (r / "cost_report.md").read_text()
    assert not (r / "cost_report.png").exists()  # drawn for tracked runs only


def test_training_learns_below_unigram_entropy(tiny_overrides, tmp_path):
    summary = run([*tiny_overrides, "train.steps=300", "train.eval_every=300", "train.eval_batches=4",
                   "train.log_every=50", "optim.lr=3e-3", "train.checkpoint_every=300", "tracking.mlflow=false",
                   "train.micro_batch_size=8", "train.global_batch_size=16"],
                  tmp_path / "learn")
    from data.stats import describe

    baseline = describe(tiny_overrides[-1].split("=", 1)[1])["unigram_loss_val"]
    assert summary["val_loss"] < baseline - 0.3, (summary["val_loss"], baseline)


def test_mlflow_sqlite_store_gets_params_metrics_and_artifacts(tiny_overrides, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tracked"
    run([*tiny_overrides, *COMMON[:-1], "tracking.experiment=e2e", "tracking.flush_every=5"], run_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["model.d_model"] == "64"
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) == 12
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "val_loss")] == [6, 12]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "summary.json", "cost_report.md", "cost_report.png"} <= artifacts
    assert (tmp_path / "runs" / "mlartifacts" / mlrun.info.run_id / "artifacts" / "summary.json").is_file()
    assert not (tmp_path / "mlruns").exists()


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, **kwargs)


def test_cli_bad_config_fails_before_starting(tiny_overrides, tmp_path):
    result = cli("train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "x"), *tiny_overrides,
                 "model.n_kv_heads=3")
    assert result.returncode == 2
    assert "model.n_kv_heads" in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_refuses_to_overwrite_a_run_without_resume(tiny_overrides, tmp_path):
    args = ["train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"), *tiny_overrides, *COMMON[:2],
            "train.steps=2", "train.checkpoint_every=2", "tracking.mlflow=false"]
    assert cli(*args).returncode == 0
    second = cli(*args)
    assert second.returncode == 2 and "--resume auto" in second.stderr
    resumed = cli(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout


def test_document_masking_trains_and_differs_from_plain_packing(tiny_overrides, tmp_path):
    """The trainer feeds the loader's document ids to the model: same data and seed, a different loss curve
    (attention no longer crosses EOS), and it learns."""
    common = [*tiny_overrides, *COMMON[:-2], "train.checkpoint_every=100", "tracking.mlflow=false"]
    plain = run(common, tmp_path / "plain")
    masked = run([*common, "data.document_masking=true", "data.restart_positions=true"], tmp_path / "masked")
    plain_losses, masked_losses = train_losses(tmp_path / "plain"), train_losses(tmp_path / "masked")
    assert plain_losses[1] == pytest.approx(masked_losses[1], abs=0.05)  # same start, same data
    assert plain_losses != masked_losses
    assert masked_losses[12] < masked_losses[1] and masked["val_loss"] < masked_losses[1]
    assert plain["steps"] == masked["steps"] == 12
