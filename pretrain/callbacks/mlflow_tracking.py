"""MLflow tracking: resolved config as params, metrics sent in batches, config/curve/summary as artifacts.

The store defaults to a sqlite file in the runs folder (`RUN_DIR/../mlflow.db`); MLFLOW_TRACKING_URI or
`tracking.tracking_uri` override it. A resumed run continues the same MLflow run (its id is kept in the run dir).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data.atomic_file import write_atomically
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
    """Rank 0's tracking. A tracking server that is down (at the start, or for a while mid-run) costs the run
    nothing: what could not be sent waits in memory (and in metrics.jsonl) and is sent once the server answers,
    tried again at most every `retry_every_s`. At the end it waits up to `end_wait_s` for the server; what is still
    unsent then is kept in RUN_DIR/mlflow_pending.json, sent by the run's next start or `pretrain track sync`."""

    def __init__(self, run_dir: Path, tracking_uri: str, experiment: str, run_name: str, flush_every: int,
                 retry_every_s: float = 15.0, end_wait_s: float = 60.0):
        self.run_dir = Path(run_dir)
        self.tracking_uri = resolve_tracking_uri(tracking_uri, run_dir)
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.name
        self.flush_every = flush_every
        self.retry_every_s = retry_every_s
        self.end_wait_s = end_wait_s
        self.outbox = Outbox(self.run_dir)
        self.client = None
        self.run_id: str | None = None
        self.params: dict[str, str] = {}
        self.unreachable_since: float | None = None
        self.next_try = 0.0

    def on_train_start(self, trainer) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        if self.tracking_uri.startswith(("http://", "https://")):  # fail fast while it is down: we retry ourselves
            for name, value in SERVER_CLIENT_SETTINGS.items():
                os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.outbox.take_spooled()
        params = flatten(config_to_dict(trainer.cfg))
        params["model.num_parameters"] = trainer.num_parameters
        self.params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in sorted(params.items())}
        self.sync(force=True)

    def _open_run(self) -> None:
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():  # a resumed run continues its MLflow run
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
        self.outbox.params.update(self.params)

    def sync(self, force: bool = False) -> bool:
        """Sends what waits; False (and a warning at the start of an outage) when the server does not answer."""
        if not force and time.time() < self.next_try:
            return False
        try:
            if self.run_id is None:
                self._open_run()
            self.outbox.send(self.client, self.run_id)
        except Exception as exc:  # the store is unreachable or refused: keep everything, try again later
            self.next_try = time.time() + self.retry_every_s
            if self.unreachable_since is None:
                self.unreachable_since = time.time()
                print(f"warning: MLflow at {self.tracking_uri} did not take the run's data "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); training goes on, metrics are kept "
                      f"(and in metrics.jsonl) and sent when it answers (tried every {self.retry_every_s:g} s)",
                      flush=True)
            return False
        if self.unreachable_since is not None:
            print(f"MLflow at {self.tracking_uri} answers again after {time.time() - self.unreachable_since:.0f} s: "
                  "everything kept meanwhile is sent", flush=True)
            self.unreachable_since = None
        return True

    def _queue(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v:  # skip NaN
                self.outbox.metrics.append((k, float(v), now, step))

    def on_step_end(self, trainer, metrics) -> None:
        if not trainer.should_log():
            return
        self._queue(trainer.step, metrics)
        if (trainer.step // trainer.cfg.train.log_every) % self.flush_every == 0 or self.unreachable_since:
            self.sync()

    def on_eval(self, trainer, metrics) -> None:
        self._queue(trainer.step, metrics)
        self.sync()

    def on_train_end(self, trainer, summary) -> None:
        self._queue(trainer.step, {f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        self._queue(trainer.step, {f"accounting/{k}": v for k, v in (summary.get("accounting") or {}).items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
        plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.outbox.artifacts.append(str(self.run_dir / name))
        self.outbox.status = "KILLED" if summary.get("stopped") else "FINISHED"
        deadline = time.time() + self.end_wait_s
        while not self.sync(force=True):
            if time.time() + self.retry_every_s > deadline:
                path = self.outbox.spool()
                print(f"warning: MLflow at {self.tracking_uri} still does not answer: what it lacks is kept in {path} "
                      f"and sent by this run's next start or `pretrain track sync {self.run_dir}`", flush=True)
                return
            time.sleep(self.retry_every_s)


# A tracking server's client gives up at once (the default retries for minutes, blocking training meanwhile).
SERVER_CLIENT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
ARTIFACTS = ("config.yaml", "loss_curve.png", "summary.json", "moe_load.jsonl", "accounting.json", "cost_report.md",
             "cost_report.png")
PENDING_FILE = "mlflow_pending.json"


class Outbox:
    """What the tracking store has not taken yet: parameters, metrics (key, value, ms timestamp, step), artifact
    files, the run's final status. Sent in that order; each part leaves the outbox once the store took it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / PENDING_FILE
        self.params: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int, int]] = []
        self.artifacts: list[str] = []
        self.status: str | None = None

    def __len__(self) -> int:
        return len(self.params) + len(self.metrics) + len(self.artifacts) + (self.status is not None)

    def send(self, client, run_id: str) -> None:
        from mlflow.entities import Metric, Param

        while self.params:
            batch = sorted(self.params.items())[:100]
            client.log_batch(run_id, params=[Param(k, v) for k, v in batch])
            for k, _ in batch:
                del self.params[k]
        while self.metrics:
            client.log_batch(run_id, metrics=[Metric(*m) for m in self.metrics[:1000]])
            del self.metrics[:1000]
        while self.artifacts:
            if Path(self.artifacts[0]).is_file():
                client.log_artifact(run_id, self.artifacts[0])
            self.artifacts.pop(0)
        if self.status is not None:
            client.set_terminated(run_id, status=self.status)
            self.status = None
        if self.path.is_file():
            self.path.unlink()

    def spool(self) -> Path:
        write_atomically(self.path, json.dumps({"params": self.params, "metrics": self.metrics,
                                                "artifacts": self.artifacts, "status": self.status}))
        return self.path

    def take_spooled(self) -> None:
        """A previous attempt's unsent data goes out first (the file goes once all is sent)."""
        if not self.path.is_file():
            return
        held = json.loads(self.path.read_text())
        self.params = {**held["params"], **self.params}
        self.metrics = [tuple(m) for m in held["metrics"]] + self.metrics
        self.artifacts = held["artifacts"] + self.artifacts
        self.status = held["status"]


def sync_spooled(run_dir: Path, tracking_uri: str = "") -> int:
    """`pretrain track sync RUN_DIR`: sends what a run kept in mlflow_pending.json; returns how many items went."""
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    outbox = Outbox(run_dir)
    if not outbox.path.is_file():
        return 0
    id_file = run_dir / RUN_ID_FILE
    if not id_file.is_file():
        raise ValueError(f"{run_dir} has {PENDING_FILE} but no {RUN_ID_FILE}: the MLflow run was never created")
    outbox.take_spooled()
    count = len(outbox)
    outbox.send(MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, run_dir)), id_file.read_text().strip())
    return count


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
