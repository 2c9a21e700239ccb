"""`metrics.jsonl` is followed live by users' scripts and by the launch tests while a run writes it."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from pretrain.callbacks.metrics_log import MetricsLog, read_metrics


def test_a_line_still_being_written_is_not_read_as_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = json.dumps({"step": 1, "split": "train", "loss": 6.5}) + "\n"
    path.write_text(whole + '{"step": 2, "split": "train", "loss": 6.2, ')
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 6.5}]
    path.write_text(whole + json.dumps({"step": 2, "split": "train", "loss": 6.2}) + "\n")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_a_resumed_run_replaces_the_file_whole_instead_of_truncating_it(tmp_path):
    """A reader holding the old file while the resumed run drops the steps after its checkpoint keeps a whole file:
    the history is written aside and renamed over it, never truncated in place."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    trainer = SimpleNamespace(step=0, should_log=lambda: True)
    for step in (1, 2, 3):
        trainer.step = step
        log.on_step_end(trainer, {"loss": 7.0 - step})
    with open(path) as held_by_a_reader:
        trainer.step = 2
        log.on_train_start(trainer)
        assert [json.loads(line)["step"] for line in held_by_a_reader] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
