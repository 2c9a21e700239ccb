"""Progress: a live bar on a terminal, plain log lines otherwise (CI, SLURM logs, pipes)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from pretrain.callbacks.base import Callback


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}", f"tok/s {metrics['tokens_per_s']:,.0f}"]
    if metrics.get("mfu") is not None:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    return " | ".join(parts)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress(Callback):
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None

    def on_train_start(self, trainer) -> None:
        if self.enabled and interactive():
            self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, trainer, metrics) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if trainer.should_log():
                self.bar.set_postfix_str(format_metrics(metrics))
        elif trainer.should_log():
            remaining = trainer.cfg.train.steps - trainer.step
            eta = remaining * metrics.get("step_time", 0.0)
            print(
                f"step {trainer.step}/{trainer.cfg.train.steps} | {format_metrics(metrics)} | eta {format_eta(eta)}",
                flush=True,
            )

    def on_eval(self, trainer, metrics) -> None:
        shown = " | ".join(f"{name} {value:.4f}" if name != "val_ppl" else f"{name} {value:.2f}"
                           for name, value in metrics.items())
        line = f"eval step {trainer.step} | {shown}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, trainer, summary) -> None:
        if self.bar is not None:
            self.bar.close()
