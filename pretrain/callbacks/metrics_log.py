"""`RUN_DIR/metrics.jsonl`: one JSON object per logged step (train) or evaluation (val)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from data.atomic_file import write_atomically
from pretrain.callbacks.base import Callback


def read_metrics(path: Path) -> list[dict]:
    """The complete records: a last line without its newline is a record being written by a live run, not yet one."""
    if not path.is_file():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


class MetricsLog(Callback):
    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, trainer) -> None:
        # A resumed run rewrites history after its checkpoint, so the file shows one clean curve.
        # Replaced whole, so a reader following the live file never sees it half rewritten.
        kept = [r for r in read_metrics(self.path) if r["step"] <= trainer.step]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.should_log():
            self._append({"step": trainer.step, "split": "train", **metrics})

    def on_eval(self, trainer, metrics) -> None:
        self._append({"step": trainer.step, "split": "val", **metrics})
