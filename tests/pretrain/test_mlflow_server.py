"""Tracking against a real MLflow tracking server (started here, on a free loopback port)."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.pretrain.conftest import free_port


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up in 90 s:\n" + (tmp_path / "server.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_training_run_tracked_on_server(mlflow_server, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"),
         *tiny_overrides, "train.steps=6", "train.log_every=2", "train.eval_every=3", "train.eval_batches=1",
         "train.checkpoint_every=6", "tracking.experiment=server"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("server")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")] == [2, 4, 6]
    assert mlrun.data.params["train.steps"] == "6"
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert not (tmp_path / "mlflow.db").exists()  # the environment's URI won over the sqlite default
