"""MLflow tracking: resolved config as params, metrics sent in batches, config/curve/summary as artifacts.

The store defaults to a sqlite file in the runs folder (`RUN_DIR/../mlflow.db`); MLFLOW_TRACKING_URI or
`tracking.tracking_uri` override it. A resumed run continues the same MLflow run (its id is kept in the run dir).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pretrain.callbacks.base import Callback
from pretrain.callbacks.metrics_log import read_metrics
from pretrain.config import config_to_dict, flatten

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
RUN_ID_FILE = "mlflow_run_id"
PARENT_RUN_ENV = "PRETRAIN_MLFLOW_PARENT_RUN"
MAX_PARAM_LENGTH = 500


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database, not into `./mlruns` of whatever folder we run in."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def resolve_tracking_uri(configured: str, run_dir: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


class MLflowTracking(Callback):
    def __init__(self, run_dir: Path, tracking_uri: str, experiment: str, run_name: str, flush_every: int):
        self.run_dir = Path(run_dir)
        self.tracking_uri = resolve_tracking_uri(tracking_uri, run_dir)
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.name
        self.flush_every = flush_every
        self.pending: list = []
        self.client = None
        self.run_id: str | None = None

    def on_train_start(self, trainer) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.experiment, artifact_location=local_artifact_location(self.tracking_uri))
        tags = {"run_dir": str(self.run_dir.resolve())}
        if os.environ.get(PARENT_RUN_ENV):  # a phase of `pretrain recipe`: a child of the recipe's run
            tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        self._log_params(trainer)

    def _log_params(self, trainer) -> None:
        from mlflow.entities import Param

        params = flatten(config_to_dict(trainer.cfg))
        params["model.num_parameters"] = trainer.num_parameters
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _queue(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v:  # skip NaN
                self.pending.append(Metric(k, float(v), now, step))

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []

    def on_step_end(self, trainer, metrics) -> None:
        if not trainer.should_log():
            return
        self._queue(trainer.step, metrics)
        if (trainer.step // trainer.cfg.train.log_every) % self.flush_every == 0:
            self.flush()

    def on_eval(self, trainer, metrics) -> None:
        self._queue(trainer.step, metrics)
        self.flush()

    def on_train_end(self, trainer, summary) -> None:
        self._queue(trainer.step, {f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        self.flush()
        curve = self.run_dir / "loss_curve.png"
        plot_loss_curve(self.run_dir / "metrics.jsonl", curve)
        for name in ("config.yaml", "loss_curve.png", "summary.json", "moe_load.jsonl"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, status="KILLED" if summary.get("stopped") else "FINISHED")


def log_evaluation(run_dir: Path, tracking_uri: str, step: int, metrics: dict[str, float], report_file: Path
                   ) -> str | None:
    """An evaluation of one of a run's checkpoints, logged into that run's MLflow run: its metrics at the checkpoint's
    step and its report as an artifact under `eval/`. Returns the run id; None when the run was not tracked."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, run_dir))
    run_id = id_file.read_text().strip()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(metrics.items())])
    client.log_artifact(run_id, str(report_file), artifact_path="eval")
    return run_id


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
