"""Data accounting by window ids, not by the loader's counter: a run started at DP=2, resumed at DP=1 and resumed
again at DP=2 (`data.record_windows`: each reading rank logs the global index of every training window it takes)
takes every window of the stream exactly once, in order, step by step."""

import json
from collections import defaultdict

from tests.parallel.cli_runs import train, train_metrics


def test_every_window_once_across_restarts_and_dp_changes(parallel_data, tmp_path):
    run_dir = tmp_path / "run"
    record = ["data.record_windows=true"]
    train(parallel_data, run_dir, *record, "parallel.dp=2", "train.steps=4", nproc=2)
    train(parallel_data, run_dir, *record, "train.steps=6", resume="auto")
    train(parallel_data, run_dir, *record, "parallel.dp=2", "train.steps=8", nproc=2, resume="auto")
    assert sorted(train_metrics(run_dir)) == list(range(1, 9))

    taken: dict[int, list[int]] = defaultdict(list)
    files = sorted((run_dir / "windows").glob("rank_*.jsonl"))
    assert [f.name for f in files] == ["rank_0.jsonl", "rank_1.jsonl"]
    for path in files:
        for line in path.read_text().splitlines():
            record_ = json.loads(line)
            taken[record_["step"]] += record_["windows"]
    global_batch = 8
    assert sorted(taken) == list(range(1, 9))
    for step, windows in taken.items():
        assert sorted(windows) == list(range((step - 1) * global_batch, step * global_batch)), step
