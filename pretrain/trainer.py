"""The training loop as a recipe: batches in, optimizer steps out; side concerns live in callbacks."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from data.loader import TokenWindowLoader
from pretrain.callbacks.base import Callback
from pretrain.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from pretrain.config import Config, config_to_yaml
from pretrain.hardware import peak_flops
from pretrain.model.flops import count_parameters, flops_per_token
from pretrain.model.loss import lm_loss
from pretrain.optim import build_optimizer, lr_at, set_lr

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.callbacks = callbacks or []
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed, cfg.train.deterministic)

        self.model = cfg.model.build().to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        t = cfg.train
        self.train_loader = TokenWindowLoader(
            cfg.data, split="train", micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
            dp_rank=0, dp_size=cfg.dp_size, seed=t.seed,
        )
        self.val_loader = TokenWindowLoader(
            cfg.data, split="val", micro_batch_size=t.micro_batch_size,
            global_batch_size=t.micro_batch_size * cfg.dp_size, dp_rank=0, dp_size=cfg.dp_size, seed=t.seed,
        )
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=t.keep_last)

        self.step = 0
        self.tokens_seen = 0
        self.wall_seconds_before = 0.0
        self.last_saved_step = -1
        self.attempt_started = time.perf_counter()
        self.last_val: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.num_parameters = count_parameters(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device, t.precision)
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len

    # -- helpers the callbacks use -------------------------------------------------------------
    def should_log(self) -> bool:
        return self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- the recipe -----------------------------------------------------------------------------
    def fit(self, resume: str | None = None) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        self.attempt_started = time.perf_counter()
        if resume:
            self.resume(resume)
        self._emit("on_train_start")
        interval_start, interval_tokens = time.perf_counter(), 0
        while self.step < self.cfg.train.steps:
            metrics = self.train_step()
            interval_tokens += self.tokens_per_step
            if self.should_log():
                elapsed = time.perf_counter() - interval_start
                metrics["tokens_per_s"] = interval_tokens / elapsed
                metrics["step_time"] = elapsed * self.tokens_per_step / interval_tokens
                metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self.peak_flops
                interval_start, interval_tokens = time.perf_counter(), 0
            self.last_train = metrics
            self._emit("on_step_end", metrics)
            if self.step % self.cfg.train.eval_every == 0 or self.step == self.cfg.train.steps:
                self.run_eval()
        summary = self.summary(time.perf_counter() - self.attempt_started)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._emit("on_train_end", summary)
        return summary

    def train_step(self) -> dict[str, float]:
        self.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.cfg.train.steps, self.cfg.optim))
        accum = self.cfg.grad_accum_steps
        total_loss = torch.zeros((), device=self.device)
        total_ce = torch.zeros((), device=self.device)
        for _ in range(accum):
            batch = next(self.train_loader)
            input_ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(input_ids)
            loss, parts = lm_loss(logits, labels, self.cfg.train.label_smoothing, self.cfg.train.z_loss)
            (loss / accum).backward()
            total_loss += loss.detach() / accum
            total_ce += parts["ce"].detach() / accum
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        loss_value = total_loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {self.step}; lower optim.lr or check the data")
        return {
            "loss": loss_value,
            "ce": total_ce.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
        }

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        self.val_loader.reset()
        losses = []
        for _ in range(self.cfg.train.eval_batches):
            batch = next(self.val_loader)
            with self.autocast():
                logits = self.model(batch["input_ids"].to(self.device))
            _, parts = lm_loss(logits, batch["labels"].to(self.device))
            losses.append(parts["ce"].item())
        val_loss = sum(losses) / len(losses)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def run_eval(self) -> None:
        if self.cfg.train.eval_batches == 0:
            return
        self.last_val = self.evaluate()
        self._emit("on_eval", self.last_val)

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "wall_seconds": self.wall_seconds_before + (time.perf_counter() - self.attempt_started),
            "train_loader": self.train_loader.state_dict(),
            "tokenizer": self.train_loader.tokenizer_reference(),
            "last_val": self.last_val,
            "last_train": self.last_train,
        }

    def save_checkpoint(self) -> Path:
        path = self.checkpoints.save(
            self.step, self.model, self.optimizer, self.state(), config_to_yaml(self.cfg)
        )
        self.last_saved_step = self.step
        self._emit("on_checkpoint", path)
        return path

    def resume(self, resume: str) -> None:
        path = self.checkpoints.latest_valid() if resume == "auto" else Path(resume)
        if path is None:
            print(f"no checkpoint under {self.checkpoints.root}: starting from step 0", flush=True)
            return
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        loaded = load_checkpoint(path, self.model, self.optimizer)
        self.step = loaded.step
        self.tokens_seen = loaded.state["tokens_seen"]
        self.wall_seconds_before = loaded.state["wall_seconds"]
        self.train_loader.load_state_dict(loaded.state["train_loader"])
        self.last_val = loaded.state.get("last_val", {})
        self.last_train = loaded.state.get("last_train", {})
        self.last_saved_step = self.step
        print(f"resumed from {path} at step {self.step}", flush=True)

    def summary(self, run_seconds: float) -> dict[str, Any]:
        wall = self.wall_seconds_before + run_seconds
        tokens_per_s = self.tokens_seen / wall if wall > 0 else 0.0
        return {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "final_train_loss": self.last_train.get("loss"),
            "val_loss": self.last_val.get("val_loss"),
            "val_ppl": self.last_val.get("val_ppl"),
            "wall_seconds": wall,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "num_parameters": self.num_parameters,
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
        }
