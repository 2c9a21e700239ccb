"""`RUN_DIR/moe_load.jsonl`: tokens routed to each expert of every MoE layer, one line per logged step (summed over
the step's micro-batches and data-parallel ranks). Too many numbers for metrics (DeepSeek-V3: 58 layers x 256
experts), so a file, which MLflow tracking uploads as an artifact; the per-layer summaries (imbalance, dropped
share) are metrics."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.callbacks.base import Callback


class ExpertLoadLog(Callback):
    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, trainer) -> None:
        if self.path.is_file():  # a resumed run rewrites what came after its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= trainer.step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.expert_loads and trainer.should_log():
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.step, **trainer.expert_loads}) + "\n")
