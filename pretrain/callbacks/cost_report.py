"""At the end of a run, its cost report (`pretrain cost report RUN_DIR`) as RUN_DIR/cost_report.md, and its plot
(cost_report.png) when the run is tracked, so that tracking uploads them with the other artifacts (matplotlib costs
every untracked run a second; `pretrain cost report RUN_DIR --plot FILE` draws it on demand). A report that cannot be
made is a warning, never a failed run."""

from __future__ import annotations

from pathlib import Path

from pretrain.callbacks.base import Callback


class CostReport(Callback):
    def __init__(self, run_dir: Path, plot: bool):
        self.run_dir = Path(run_dir)
        self.plot = plot

    def on_train_end(self, trainer, summary) -> None:
        trainer.accounting.record(trainer.step, trainer.tokens_seen)  # the ledger as of now, for the report
        try:
            from tools.cost_report import write_cost_report

            write_cost_report(self.run_dir, plot=self.plot)
        except Exception as exc:  # noqa: BLE001  (the run itself is done and saved)
            print(f"warning: no cost report for {self.run_dir}: {type(exc).__name__}: {exc}", flush=True)
