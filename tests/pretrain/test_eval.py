"""`pretrain eval`: loss by position and passkey retrieval of a checkpoint."""

import json

import pytest
import torch

from pretrain.cli import main
from pretrain.evaluate import EvalSettings, answer_matches, evaluate_checkpoint, load_for_eval


def test_long_ppl_at_the_trained_length_is_the_runs_validation_loss(base_run):
    # the run evaluated 2 batches of 4 windows of 64 tokens at step 4: the same first 8 validation windows
    report = evaluate_checkpoint(base_run["checkpoint"], EvalSettings(tasks=("long_ppl",), windows=8, buckets=4))
    r = report["long_ppl"]
    assert r["seq_len"] == 64 and r["windows"] == 8 and report["step"] == 4
    assert r["loss"] == pytest.approx(base_run["summary"]["val_loss"], abs=1e-5)
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
    assert main(["eval", str(base_run["checkpoint"]), "--tasks", "mmlu"]) == 2
    assert main(["eval", str(base_run["checkpoint"]), "--depths", "2"]) == 2
    assert "--depths" in capsys.readouterr().err
