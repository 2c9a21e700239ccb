"""`pretrain eval`: loss by position and passkey retrieval of a checkpoint."""

import json

import pytest
import torch

from pretrain.cli import main
from pretrain.evaluate import (
    EvalSettings,
    answer_matches,
    evaluate_checkpoint,
    load_for_eval,
    teacher_forced_key_logprobs,
)


def test_long_ppl_at_the_trained_length_is_the_runs_validation_loss(base_run):
    # the run evaluated 2 batches of 4 windows of 64 tokens at step 4: the same first 8 validation windows
    report = evaluate_checkpoint(base_run["checkpoint"], EvalSettings(tasks=("long_ppl",), windows=8, buckets=4))
    r = report["long_ppl"]
    assert r["seq_len"] == 64 and r["windows"] == 8 and report["step"] == 4
    # the same windows in other batch shapes: equal up to summation order (2e-6 relative on an AVX-512 CPU); other
    # windows would be off by ~1e-2
    assert r["loss"] == pytest.approx(base_run["summary"]["val_loss"], rel=1e-5)
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert sum(b["loss"] for b in r["buckets"]) / 4 == pytest.approx(r["loss"], abs=1e-6)


def test_overrides_change_the_evaluated_model(base_run):
    linear = ["model.rope.scaling=linear", "model.rope.factor=2", "model.rope.original_max_seq_len=64"]
    plain, scaled = load_for_eval(base_run["checkpoint"]), load_for_eval(base_run["checkpoint"], linear)
    assert torch.allclose(scaled.model.inv_freq * 2, plain.model.inv_freq)  # position interpolation by 2
    for (name, a), b in zip(plain.model.state_dict().items(), scaled.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same weights
    report = evaluate_checkpoint(base_run["checkpoint"], EvalSettings(tasks=("long_ppl",), windows=1), linear)
    assert report["rope_scaling"] == "linear" and report["rope_factor"] == 2


def test_passkey_answers_are_matched_exactly():
    assert answer_matches(" 12345. The", "12345")
    assert not answer_matches(" 1234. The", "12345")
    assert not answer_matches(" 123456", "12345")
    assert not answer_matches(" The pass key is 12345", "12345")  # the digits must come first


def test_key_logprobs_are_the_training_loss_on_the_key_tokens(base_run):
    """The graded passkey score is the next-token loss of the key's tokens after the prompt, as training computes it
    (cross-entropy over one window with every other label ignored)."""
    import torch.nn.functional as F

    loaded = load_for_eval(base_run["checkpoint"])
    prompt, key = torch.tensor([[1, 40, 41, 42, 43, 44]]), [50, 51, 52]
    logprobs = teacher_forced_key_logprobs(loaded, prompt, key)
    window = torch.tensor([[*prompt[0].tolist(), *key]])
    labels = torch.full_like(window, -100)
    labels[0, -len(key):] = torch.tensor(key)
    with torch.no_grad():
        logits = loaded.model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
    assert logprobs.shape == (3,)
    assert torch.allclose(-logprobs, loss[-3:], atol=1e-5)
    assert (loss[:-3] == 0).all()  # the prompt's own positions are not scored


def test_cli_writes_the_table_and_json(base_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", str(base_run["checkpoint"]), "--tasks", "long_ppl,passkey", "--windows", "2",
                 "--lengths", "200,300", "--depths", "0,1", "--trials", "2", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "long_ppl: validation loss by position" in text and "length \\ depth" in text
    report = json.loads(out.read_text())
    cells = report["passkey"]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(200, 0.0), (200, 1.0), (300, 0.0), (300, 1.0)]
    assert all(0 <= c["accuracy"] <= 1 and c["trials"] == 2 for c in cells)
    assert all(c["key_logprob"] < 0 and 0 <= c["first_token_accuracy"] <= 1 for c in cells)
    assert report["passkey"]["key_logprob"] == pytest.approx(sum(c["key_logprob"] for c in cells) / 4)
    assert "mean log-probability per key token" in text
    assert main(["eval", str(base_run["checkpoint"]), "--tasks", "mmlu"]) == 2
    assert main(["eval", str(base_run["checkpoint"]), "--depths", "2"]) == 2
    assert "--depths" in capsys.readouterr().err


def test_results_go_into_the_runs_mlflow_run(base_run, tmp_path, monkeypatch, capsys):
    """A tracked run (its MLflow run id in the run folder) gets the evaluation's metrics at the checkpoint's step
    and the report as an artifact, in a real sqlite MLflow store; `--no-mlflow` logs nothing."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pretrain.callbacks.mlflow_tracking import RUN_ID_FILE, default_tracking_uri, local_artifact_location

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "tracked"
    shutil.copytree(base_run["checkpoint"].parent.parent, run_dir)
    uri = default_tracking_uri(run_dir)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("eval", local_artifact_location(uri))).info.run_id
    (run_dir / RUN_ID_FILE).write_text(run_id)
    checkpoint = run_dir / "checkpoints" / base_run["checkpoint"].name
    args = ["eval", str(checkpoint), "--tasks", "long_ppl,passkey", "--windows", "2", "--lengths", "200",
            "--depths", "0", "--trials", "1", "--out", str(tmp_path / "eval.json")]
    assert main([*args, "--no-mlflow"]) == 0
    assert not client.get_run(run_id).data.metrics
    assert main(args) == 0
    assert f"MLflow run {run_id}" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    history = client.get_metric_history(run_id, "eval/long_ppl/loss_64")
    assert [(m.step, m.value) for m in history] == [(4, pytest.approx(report["long_ppl"]["loss"]))]
    assert client.get_run(run_id).data.metrics["eval/passkey/len_200_depth_0.00"] == report["passkey"]["accuracy"]
    assert client.get_run(run_id).data.metrics["eval/passkey/key_logprob"] == report["passkey"]["key_logprob"]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/step_00000004_as_trained.json"]
