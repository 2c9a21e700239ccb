import json

from tools.long_context_report import main


def report(scaling, losses, accuracies):
    lengths = [256, 512]
    return {
        "checkpoint": "c", "step": 1, "rope_scaling": scaling, "rope_factor": 4.0, "trained_seq_len": 256,
        "long_ppl": {"seq_len": 512, "windows": 2, "data_dir": "d", "loss": sum(losses) / 2,
                     "buckets": [{"start": 0, "end": 256, "loss": losses[0]}, {"start": 256, "end": 512,
                                                                            "loss": losses[1]}]},
        "passkey": {"lengths": lengths, "depths": [0.0, 1.0], "key_digits": 5, "accuracy": 0.0,
                    "cells": [{"length": n, "depth": d, "accuracy": a, "trials": 2}
                              for n, row in zip(lengths, accuracies, strict=True)
                              for d, a in zip([0.0, 1.0], row, strict=True)]},
    }


def test_one_row_per_report_with_buckets_and_accuracy_by_length(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(report("none", [5.0, 6.5], [[1.0, 0.5], [0.0, 0.0]])))
    (tmp_path / "b.json").write_text(json.dumps(report("yarn", [4.9, 4.8], [[1.0, 1.0], [0.5, 1.0]])))
    assert main([f"before={tmp_path / 'a.json'}", f"after={tmp_path / 'b.json'}", "--out", str(tmp_path / "t.md")]) == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| model | RoPE | loss 0-256 | loss 256-512 | passkey 256 | passkey 512 |"
    assert lines[2] == "| before | none | 5.000 | 6.500 | 75% | 0% |"
    assert lines[3] == "| after | yarn x4 | 4.900 | 4.800 | 100% | 75% |"
    assert "4 prompts per length" in capsys.readouterr().out


def test_key_logprob_columns_when_the_reports_have_them(tmp_path):
    graded = report("yarn", [4.9, 4.8], [[1.0, 1.0], [0.5, 1.0]])
    for cell, logprob, found in zip(graded["passkey"]["cells"], [-0.1, -0.3, -2.0, -1.0], [1, 1, 0.5, 1], strict=True):
        cell["key_logprob"], cell["first_token_accuracy"] = logprob, found
    (tmp_path / "g.json").write_text(json.dumps(graded))
    assert main([f"after={tmp_path / 'g.json'}", "--out", str(tmp_path / "t.md")]) == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].endswith("| passkey 256 | passkey 512 | found 256 | found 512 | key lp 256 | key lp 512 |")
    assert lines[2] == "| after | yarn x4 | 4.900 | 4.800 | 100% | 75% | 100% | 75% | -0.20 | -1.50 |"
    assert any(line.startswith("key lp: mean log-probability") for line in lines)
    assert any(line.startswith("found: the first key token right") for line in lines)
