"""Side concerns of the training loop, one callback each."""

from __future__ import annotations

from pathlib import Path

from pretrain.callbacks.base import Callback
from pretrain.callbacks.checkpointing import Checkpointing
from pretrain.callbacks.cost_report import CostReport
from pretrain.callbacks.expert_load_log import ExpertLoadLog
from pretrain.callbacks.metrics_log import MetricsLog
from pretrain.callbacks.progress import Progress
from pretrain.config import Config


def default_callbacks(cfg: Config, run_dir: Path, main_rank: bool = True) -> list[Callback]:
    """Checkpointing runs on every rank (saving is collective); logging and tracking on the main rank only."""
    if not main_rank:
        return [Checkpointing()]
    callbacks: list[Callback] = [MetricsLog(Path(run_dir) / "metrics.jsonl"), Progress(cfg.tracking.progress_bar)]
    if cfg.model.moe.enabled:
        callbacks.append(ExpertLoadLog(Path(run_dir) / "moe_load.jsonl"))
    callbacks.append(CostReport(Path(run_dir), plot=cfg.tracking.mlflow))  # before tracking, which uploads it
    if cfg.tracking.mlflow:
        from pretrain.callbacks.mlflow_tracking import MLflowTracking

        t = cfg.tracking
        callbacks.append(MLflowTracking(run_dir, t.tracking_uri, t.experiment, t.run_name, t.flush_every,
                                        t.retry_every_s, t.end_wait_s))
    callbacks.append(Checkpointing())
    return callbacks
