"""Tracking against a real MLflow tracking server (started here, on a free loopback port)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.pretrain.conftest import free_port


class MlflowServer:
    """A real `mlflow server` on a fixed loopback port over one sqlite store, which can be stopped and started
    again (an outage)."""

    def __init__(self, folder):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout=90):
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
        log = self.folder / "server.log"
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "a"), start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return
            except OSError:
                assert self.proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not come up in {timeout} s:\n" + log.read_text()[-2000:])

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path):
    started = MlflowServer(tmp_path)
    started.start()
    yield started
    started.stop()


@pytest.fixture
def mlflow_server(server):
    return server.url


def test_training_run_tracked_on_server(mlflow_server, tiny_overrides, tmp_path):
    """A DP=2 run logs to a real tracking server from rank 0 alone: one run, each logged step once, the parameters,
    and the artifacts, the cost report and its plot among them."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"),
         "--nproc", "2", *tiny_overrides, "parallel.dp=2", "train.steps=6", "train.log_every=2",
         "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=6", "tracking.experiment=server"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("server")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")] == [2, 4, 6]
    assert mlrun.data.params["train.steps"] == "6" and mlrun.data.params["parallel.dp"] == "2"
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"loss_curve.png", "accounting.json", "cost_report.md", "cost_report.png", "summary.json"} <= artifacts
    assert mlrun.data.metrics["accounting/accelerator_hours"] > 0  # 2 processes' wall time
    report = client.download_artifacts(mlrun.info.run_id, "cost_report.md", str(tmp_path / "downloaded"))
    assert "2 × CPU process" in open(report).read()
    assert not (tmp_path / "mlflow.db").exists()  # the environment's URI won over the sqlite default


def logged_steps(run_dir):
    from pretrain.callbacks.metrics_log import read_metrics

    try:
        return max([r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"],
                   default=0)
    except (OSError, ValueError):
        return 0


def wait_for_step(proc, run_dir, step, timeout=300):
    deadline = time.time() + timeout
    while logged_steps(run_dir) < step:
        assert proc.poll() is None, f"training ended before step {step}: {proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"step {step} not logged in {timeout} s"
        time.sleep(0.2)


def uploaded_after(client, step):
    experiment = client.get_experiment_by_name("outage")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return bool(runs) and max((m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")),
                              default=0) > step


def test_server_outages_lose_nothing(server, tiny_overrides, tmp_path):
    """The server dies at step 5 and comes back after step 15: training goes on and every metric arrives. It dies
    again before the end: the run waits `end_wait_s`, keeps what is unsent, and `pretrain track sync` sends it."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "r"
    steps = 80
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PRETRAIN_TEST_SLOW": "0:0.25"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
         *tiny_overrides, f"train.steps={steps}", "train.log_every=1", "train.eval_every=20", "train.eval_batches=1",
         "train.checkpoint_every=20", "tracking.experiment=outage", "tracking.flush_every=1",
         "tracking.retry_every_s=0.5", "tracking.end_wait_s=2", "tracking.progress_bar=false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_step(proc, run_dir, 5)
        server.stop()
        wait_for_step(proc, run_dir, 15)
        server.start()
        client = MlflowClient(tracking_uri=server.url)
        deadline = time.time() + 120
        while not uploaded_after(client, 15):  # the run sends again, what waited included
            assert time.time() < deadline and proc.poll() is None, "nothing sent after the server came back"
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the second outage: make it longer"
        server.stop()
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("did not take the run's data") == 2, output[-3000:]
    assert "answers again" in output and "mlflow_pending.json" in output, output[-3000:]
    assert (run_dir / "mlflow_pending.json").is_file()

    server.start()
    sync = subprocess.run([sys.executable, "-m", "pretrain.cli", "track", "sync", str(run_dir)],
                          env=env, capture_output=True, text=True)
    assert sync.returncode == 0 and "sent" in sync.stdout, sync.stdout + sync.stderr
    assert not (run_dir / "mlflow_pending.json").exists()
    client = MlflowClient(tracking_uri=server.url)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")] == list(range(1, steps + 1))
    assert mlrun.data.params["train.steps"] == str(steps)
    assert mlrun.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"accounting.json", "summary.json", "loss_curve.png"} <= artifacts
    assert mlrun.data.metrics["accounting/accelerator_hours"] > 0
    again = subprocess.run([sys.executable, "-m", "pretrain.cli", "track", "sync", str(run_dir)],
                           env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing kept" in again.stdout
