"""`RUN_DIR/metrics.jsonl`: one JSON object per logged step (train) or evaluation (val)."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.callbacks.base import Callback


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog(Callback):
    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, trainer) -> None:
        # A resumed run rewrites history after its checkpoint, so the file shows one clean curve.
        kept = [r for r in read_metrics(self.path) if r["step"] <= trainer.step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.should_log():
            self._append({"step": trainer.step, "split": "train", **metrics})

    def on_eval(self, trainer, metrics) -> None:
        self._append({"step": trainer.step, "split": "val", **metrics})
