"""The training loop as a recipe: batches in, optimizer steps out; side concerns live in callbacks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.chat_dataset import IGNORE_INDEX
from data.chat_loader import build_loader
from data.loader import TokenWindowLoader
from parallel.data_feed import DataFeed
from parallel.engine import PlainEngine
from parallel.grid import ProcessGrid, coordinates
from parallel.master_weights import MasterWeights
from parallel.materialize import materialize
from parallel.plan import PipelineOptions, parallelize
from parallel.tensor.comm import all_gather_dim0
from pretrain.callbacks.base import Callback
from pretrain.checkpoint import (
    MODEL,
    OPTIMIZER,
    RNG,
    CheckpointError,
    CheckpointManager,
    PendingSave,
    model_templates,
    part,
    pieces,
    read_meta,
    read_pieces,
    restore_rng,
    rng_tensors,
)
from pretrain.compile import compile_blocks
from pretrain.config import Config, config_to_dict, config_to_yaml
from pretrain.fault_injection import kill_point, signal_point, slow_point
from pretrain.hardware import peak_flops, remeasured_cpu_peak
from pretrain.heartbeat import CollectiveError, Heartbeat, default_store
from pretrain.lora_checkpoint import LORA_BASE, refuse_adapters_as_source
from pretrain.model.documents import Documents
from pretrain.model.flops import count_parameters, flops_per_token, lora_flops_per_token
from pretrain.model.lora import apply_lora, freeze_base, is_adapter
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.precision import PrecisionChoice, SlowPrecisionWarning, choose_precision
from pretrain.preference_objective import METRICS as PREFERENCE_METRICS
from pretrain.preference_objective import PreferenceObjective
from pretrain.run_accounting import RunAccounting
from pretrain.sharded_io import Fragment
from pretrain.spikes import LossSpikeDetector
from pretrain.stop import StopRequest

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


# A rank is reported as a straggler when its work before the gradient reduction exceeds the median rank's by this
# much (seconds and share of the median, both), at most once per STRAGGLER_WARN_EVERY steps.
STRAGGLER_SECONDS, STRAGGLER_SHARE, STRAGGLER_WARN_EVERY = 0.05, 0.2, 100
EVAL_STOP_POLL = 8  # evaluation batches between two (collective) checks for a stop request
CPU_PEAK_REMEASURES = 3  # fresh probes of the CPU peak a run may take when its MFU exceeds 100%


def pipeline_options(cfg: Config) -> PipelineOptions:
    p = cfg.parallel
    return PipelineOptions(schedule=p.pp_schedule, virtual_stages=p.virtual_stages, layers=list(p.pp_layers),
                           seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                           n_microbatches=cfg.grad_accum_steps)


def checkpoint_layout(cfg: Config, engine: str) -> dict[str, Any]:
    """The layout a checkpoint records as the one that wrote it."""
    p = cfg.parallel
    return {"world_size": p.world_size, "tp": p.tp, "pp": p.pp, "dp": p.dp, "cp": p.cp, "ep": p.ep,
            "virtual_stages": p.virtual_stages, "engine": engine,
            "zero_stage": cfg.deepspeed.zero_stage if engine == "deepspeed" else None}


def check_initialization_source(meta, cfg: Config, tokenizer: dict[str, str]) -> None:
    """The checkpoint holds every tensor of this model with the same full shape, and its tokenizer is the data's."""
    refuse_adapters_as_source(meta)
    with torch.device("meta"):
        wanted = {name: tuple(t.shape) for name, t in model_templates(cfg.model.build()).items()}
    stored = {k.removeprefix(MODEL): shape for k, (shape, _) in meta.tensor_shapes().items() if k.startswith(MODEL)}
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    if cfg.train.mtp == "drop":  # the source's MTP modules are not part of this phase's model
        unexpected = [name for name in unexpected if not name.startswith("mtp.")]
    reshaped = [f"{k}: {list(stored[k])} there, {list(wanted[k])} here" for k in sorted(wanted)
                if k in stored and tuple(stored[k]) != wanted[k]]
    problems = [f"missing {missing[:6]}"] if missing else []
    problems += [f"unexpected {unexpected[:6]}"] if unexpected else []
    if problems or reshaped:
        raise CheckpointError(f"{meta.path} cannot initialize this model ({'; '.join(problems + reshaped[:6])}): "
                              "only settings that add or reshape no tensor may change, e.g. the RoPE scaling or "
                              "max_seq_len")
    theirs = (meta.state.get("tokenizer") or {}).get("sha256")
    if theirs and theirs != tokenizer["sha256"]:
        raise CheckpointError(f"{meta.path} was trained with another tokenizer (sha256 {theirs[:12]}…) than the data "
                              f"of this run ({tokenizer['path']}, sha256 {tokenizer['sha256'][:12]}…): prepare the "
                              "data with `pretrain data prepare --tokenizer` of the first run")


def model_config_changes(checkpoint: Path, cfg: Config) -> list[str]:
    """'key old -> new' for every model setting that differs from the checkpoint's own config."""
    from omegaconf import OmegaConf

    source = checkpoint / "config.yaml"
    if not source.is_file():
        return []
    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out
    theirs = flat(OmegaConf.to_container(OmegaConf.load(source)).get("model", {}))
    ours = flat(config_to_dict(cfg)["model"])
    return [f"{k} {theirs.get(k)} -> {v}" for k, v in ours.items() if theirs.get(k) != v]


class Trainer:
    def __init__(
        self, cfg: Config, run_dir: Path, callbacks: list[Callback] | None = None, grid: ProcessGrid | None = None
    ):
        self.run_dir = Path(run_dir)
        self.callbacks = callbacks or []
        self.grid = grid or ProcessGrid.single()
        self.is_main = self.grid.rank == 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.accounting = RunAccounting(self.run_dir, cfg.tracking.run_name or self.run_dir.name,
                                        self.grid.shape.world_size, self.device, writes=self.is_main)
        self.phases_entered = 0  # every rank enters the same phases in the same order: a rank's place in the run
        self.phase = "setup"
        self.current_step = 0  # the step being worked on (its callbacks, evaluation and stop check included)
        self.progress = 0  # moved by every micro-batch read: the watchdog's sign of life
        with warnings.catch_warnings():  # a slow-precision warning once, from the main rank
            if not self.is_main:
                warnings.simplefilter("ignore", SlowPrecisionWarning)
            self.precision = self._agree_on_precision(choose_precision(cfg.train.precision, self.device))
        # the run's config says what it computes in (written to RUN_DIR/config.yaml, given to DeepSpeed)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=self.precision.precision))
        if cfg.train.mtp == "drop":  # this phase's model has no MTP modules (those of train.init_from are left out)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_depth=0))
        self.cfg = cfg
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed, cfg.train.deterministic)

        with torch.device("meta"):  # no memory yet: each rank materializes only its own shards below
            model = cfg.model.build()
        init_rules = model.init_rules()
        self.adapter_parameters = 0  # LoRA: the trainable parameters of the whole model (all ranks)
        if cfg.lora.enabled:  # adapters on the targeted linears; the base weights come from train.init_from
            adapters = apply_lora(model, cfg.lora)
            init_rules |= adapters
            self.adapter_parameters = sum(math.prod(rule.shape) for rule in adapters.values())
        p = cfg.parallel
        self.plan = parallelize(model, self.grid, p.sequence_parallel, p.grad_bucket_mb, pipeline_options(cfg))
        partition = None
        if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:  # each unit partitioned as soon as it is filled
            from parallel.deepspeed_engine import ZeroInitPartitioner

            partition = ZeroInitPartitioner(self.plan, cfg)
        self.model = materialize(model, self.plan, init_rules, cfg.train.seed, self.device, partition)
        self.model.recompute = cfg.train.activation_checkpointing
        self.compiled_blocks = compile_blocks(self.model) if cfg.train.compile else 0
        self.compile_seconds: float | None = None  # the first step of this attempt, which compiles the blocks
        if cfg.lora.enabled:
            freeze_base(self.model)
        # frozen weights (LoRA's base) are the initialization source's: checkpoints hold everything else
        self.frozen = frozenset(name for name, t in self.model.state_dict(keep_vars=True).items()
                                if isinstance(t, torch.nn.Parameter) and not t.requires_grad)  # tied names too
        self.mtp_depth = cfg.model.mtp_depth  # the MTP depths that train (train.mtp: freeze keeps them unchanged)
        if cfg.train.mtp == "freeze":
            self.mtp_depth, self.model.train_mtp = 0, False
            for param in self.model.mtp.parameters():
                param.requires_grad_(False)
        self.optimizer = build_optimizer(self.model, cfg.optim)  # over the fp32 parameters (the masters)
        master_weights = self._bf16_weights() if cfg.train.param_dtype == "bf16" else None
        self.moe_layers = self.model.moe_layers()
        self.expert_loads: dict[str, list[int]] = {}  # per MoE layer: tokens routed to each expert in the last step
        # MoE and MTP losses join the gradient inside the model: they get the factor the main loss gets
        for module in [self.model, *self.moe_layers.values()]:
            module.aux_loss_scale = 1.0 / cfg.grad_accum_steps
        if cfg.deepspeed.enabled:
            from parallel.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(self.model, self.optimizer, self.plan, cfg)
        else:
            self.plan.grad_reduce_dtype = torch.bfloat16 if p.grad_reduce_dtype == "bf16" else None
            self.engine = PlainEngine(self.model, self.optimizer, self.plan, cfg.optim.grad_clip, master_weights)
            if p.overlap_grad_reduce:
                with self.engine.masters_in_model():
                    self.plan.overlap_grad_reduce(
                        self.model, cfg.grad_accum_steps,
                        master_weights.register_post_accumulate_grad_hook if master_weights else None)
        t = cfg.train
        dp_rank, dp_size = self.grid.coords["dp"], self.grid.size("dp")
        self.data_feed = DataFeed.for_rank(self.grid, self.plan.pipeline, cfg.data.document_masking)
        self.train_loader = build_loader(
            cfg.data, split="train", micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
            dp_rank=dp_rank, dp_size=dp_size, seed=t.seed, reads=self.data_feed.reads,
        )
        self.val_loader = build_loader(
            cfg.data, split="val", micro_batch_size=t.micro_batch_size,
            global_batch_size=t.micro_batch_size * dp_size, dp_rank=dp_rank, dp_size=dp_size, seed=t.seed,
            reads=self.data_feed.reads,
        )
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=t.keep_last)
        self.pending_save: PendingSave | None = None
        # background saves talk over their own group, so they never interleave with the training's collectives
        background = t.async_checkpoint and self.grid.shape.world_size > 1
        self.checkpoint_group = dist.new_group(backend="gloo") if background else None

        self.step = 0
        self.tokens_seen = 0
        self.wall_seconds_before = 0.0
        self.last_saved_step = -1
        self.attempt_started = time.perf_counter()
        self.last_val: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.initialized_from: dict[str, Any] | None = None  # the checkpoint this run's weights started from
        self.resumed_ledger: dict[str, Any] | None = None  # the accounting ledger of the checkpoint resumed from
        self.stopped: str | None = None  # why the run stopped before train.steps (a signal), if it did
        self.skipped_steps = 0  # steps not applied because their gradient norm was not finite (train.on_nan=skip)
        self.rollbacks: list[dict[str, int]] = []  # {at_step, to_step} of each rollback (train.on_nan=rollback)
        self.windows_log = None  # data.record_windows: this rank's file of the training windows it took
        self.stop_request: StopRequest | None = None  # set by fit(): evaluation polls it too
        self.straggler_warned = -STRAGGLER_WARN_EVERY  # the step of the last straggler warning
        self.spikes = LossSpikeDetector(t.spike_zscore, t.spike_window, t.max_spikes)
        self.num_parameters = count_parameters(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        if cfg.lora.enabled:  # MFU counts the work done: no weight gradients for the frozen base
            self.flops_per_token = lora_flops_per_token(cfg.model, cfg.data.seq_len, self.adapter_parameters)
        # MFU against all ranks together: each process measures (or looks up) its own device's peak
        self.peak_flops = peak_flops(self.device, t.precision) * self.grid.shape.world_size
        self.accounting.describe(self.flops_per_token, self.peak_flops / self.grid.shape.world_size, t.precision)
        self.peak_remeasures_left = CPU_PEAK_REMEASURES
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        # chat data supervises some tokens only: every micro-batch's loss is weighted by its share of the global
        # batch's supervised tokens, so accumulation and data parallelism give the gradient of one big batch
        self.token_weighted = cfg.data.format != "text"
        self.units_name = "pairs" if cfg.data.format == "preference" else "supervised_tokens"
        self.supervised_tokens_seen = 0  # (chat) or pairs (preference) trained on
        self.pipeline_units = 1  # under pipeline parallelism: the step's global count, for the last stage's losses
        self.objective = None
        if cfg.data.format == "preference":  # documents: two per pair, and the padding's
            most_pairs = max(self.train_loader.max_pairs_per_window, self.val_loader.max_pairs_per_window)
            self.objective = PreferenceObjective(cfg.dpo, 2 * most_pairs + 2, self.plan.token_logprobs)
        world = self.grid.shape.world_size
        self.heartbeat = Heartbeat(default_store(), self.grid.rank, world,
                                   lambda: (self.current_step, self.phase, self.phases_entered, self.progress),
                                   cfg.parallel.timeout_s) if world > 1 else None
        signal_point("setup")

    def _bf16_weights(self) -> MasterWeights:
        """train.param_dtype=bf16: the model computes with bf16 copies of its matrices from here on."""
        if self.precision.precision != "bf16":
            raise ValueError(f"train.param_dtype=bf16 needs bf16 compute, but {self.precision.describe()}: set "
                             "train.precision=bf16 or train.param_dtype=fp32")
        master_weights = MasterWeights(self.model)
        if self.is_main:
            print(f"bf16 weights with fp32 masters: {master_weights.num_copied():,} parameters of this rank in bf16",
                  flush=True)
        return master_weights

    def _agree_on_precision(self, choice: PrecisionChoice) -> PrecisionChoice:
        """Every rank computes in the same precision: bf16 only if every rank's device runs it natively."""
        if self.grid.shape.world_size == 1 or choice.requested != "auto":
            return choice
        flag = torch.tensor([1 if choice.precision == "bf16" else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1 or choice.precision == "fp32":
            return choice
        return PrecisionChoice(choice.requested, "fp32", "another rank's device has no native bf16: fp32")

    # -- helpers the callbacks use -------------------------------------------------------------
    def _remeasure_cpu_peak(self) -> float:
        """More than 100% of the CPU peak: the probe at start ran on a busy machine. The peak is the best probe."""
        self.peak_remeasures_left -= 1
        world = self.grid.shape.world_size
        before = self.peak_flops / world
        self.peak_flops = max(before, remeasured_cpu_peak(self.cfg.train.precision)) * world
        self.accounting.describe(self.flops_per_token, self.peak_flops / world, self.cfg.train.precision)
        if self.is_main:
            print(f"note: above 100% MFU, so the CPU peak measured at start ({before / 1e9:,.1f} GFLOP/s) was low, "
                  f"the machine busy then; re-measured: {self.peak_flops / world / 1e9:,.1f} GFLOP/s per process",
                  flush=True)
        return self.peak_flops

    def should_log(self) -> bool:
        return self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _emit(self, hook: str, *args) -> None:
        self.phase = f"{hook} callbacks"
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- the recipe -----------------------------------------------------------------------------
    def fit(self, resume: str | None = None, stop_request: StopRequest | None = None) -> dict[str, Any]:
        """Trains to train.steps, or until a stop signal (SIGTERM, SIGINT, SIGUSR1) that arrives at any time after
        `stop_request` was installed (the command line installs it before building the trainer; without one, from
        here on): every rank then stops at the same point and the run is saved."""
        if stop_request is None:
            with StopRequest(announce=self.is_main) as own:
                return self.fit(resume, own)
        self.stop_request = stop_request
        try:
            return self._fit_watched(resume)
        except BaseException:
            self.accounting.record(self.step, self.tokens_seen, status="failed")
            raise
        finally:
            self.train_loader.close()
            self.val_loader.close()

    def _fit_watched(self, resume: str | None) -> dict[str, Any]:
        if self.heartbeat is None:
            return self._fit(resume)
        self.heartbeat.start()
        try:
            return self._fit(resume)
        except RuntimeError as exc:
            named = isinstance(exc, CheckpointError) and not self.phase.startswith("checkpoint save")
            if isinstance(exc, CollectiveError) or named:  # a checkpoint refused on every rank is the user's error
                raise
            behind = self.heartbeat.behind()
            raise CollectiveError(
                f"rank {self.grid.rank} (coordinates {self.grid.coords}): {self.phase} at step {self.current_step} "
                f"failed — a rank died or stopped answering (parallel.timeout_s={self.cfg.parallel.timeout_s})"
                + (f"; held up by {', '.join(behind)}" if behind else "") + f": {str(exc).splitlines()[0]}"
            ) from exc
        finally:
            self.heartbeat.stop()

    def _fit(self, resume: str | None) -> dict[str, Any]:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        self.attempt_started = time.perf_counter()
        # the weights the phase starts from, kept frozen: DPO's reference, LoRA's base (neither is in checkpoints)
        starts_frozen = self.objective is not None or self.cfg.lora.enabled
        if starts_frozen:
            self.initialize_from(Path(self.cfg.train.init_from))
        if self.objective is not None:
            self.objective.take_reference(self.model, adapters=self.cfg.lora.enabled)
        checkpoint_ledger = self.resume(resume) if resume else None
        self.accounting.begin(self.step, checkpoint_ledger)
        if self.step == 0 and self.cfg.train.init_from and not starts_frozen:
            self.initialize_from(Path(self.cfg.train.init_from))
        self._emit("on_train_start")
        if not self._stop_agreed(self.stop_request):  # a signal during start-up stops before the first step
            self.accounting.charge("training")
            self._train_loop(self.stop_request)
        if self.last_saved_step != self.step:  # the end of training (or a stop) saves the checkpoint
            self.save_checkpoint(wait=True)
        self.wait_for_checkpoint()
        self.accounting.charge("other")
        self.accounting.record(self.step, self.tokens_seen, status="stopped" if self.stopped else "finished")
        summary = self.summary(time.perf_counter() - self.attempt_started)
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._emit("on_train_end", summary)
        self.accounting.record(self.step, self.tokens_seen)
        return summary

    def _stop_agreed(self, stop_request: StopRequest) -> bool:
        """Collective: whether any rank was asked to stop (so all stop after the same step)."""
        self.phase = "stop check"
        flag = torch.tensor([1 if stop_request.requested else 0], device=self.device)
        if self.grid.shape.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())  # one host sync per step
        if stop and self.stopped is None:
            self.stopped = stop_request.requested or "a stop request on another rank"
        return stop

    def _train_loop(self, stop_request: StopRequest) -> None:
        interval_start, interval_tokens = time.perf_counter(), 0
        while self.step < self.cfg.train.steps:
            self.current_step, self.phase = self.step + 1, "step start"
            kill_point(self.current_step, "step")
            if self.heartbeat is not None:
                self.heartbeat.beat()
            step_started = time.perf_counter()
            metrics = self.train_step()
            if self.compiled_blocks and self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - step_started
                if self.is_main:
                    print(f"torch.compile: {self.compiled_blocks} blocks compiled in the first step "
                          f"({self.compile_seconds:.1f} s including the step itself)", flush=True)
            if metrics is None:  # rolled back to a checkpoint: the loop goes on from its step
                continue
            spike = self.spikes.observe(self.step, metrics["loss"])  # raises at train.max_spikes
            if spike is not None and self.is_main:
                print(f"warning: loss spike at {spike.describe()} ({len(self.spikes.spikes)} within "
                      f"{self.cfg.train.spike_window} steps; the run stops at train.max_spikes="
                      f"{self.cfg.train.max_spikes})", flush=True)
            interval_tokens += self.tokens_per_step
            if self.should_log():
                elapsed = time.perf_counter() - interval_start
                metrics["tokens_per_s"] = interval_tokens / elapsed
                metrics["step_time"] = elapsed * self.tokens_per_step / interval_tokens
                metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self.peak_flops
                if metrics["mfu"] > 1 and self.device.type == "cpu" and self.peak_remeasures_left:
                    metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self._remeasure_cpu_peak()
                interval_start, interval_tokens = time.perf_counter(), 0
            self.last_train = metrics
            self._emit("on_step_end", metrics)
            if self.step % self.cfg.train.eval_every == 0 or self.step == self.cfg.train.steps:
                with self.accounting.charging("evaluation"):
                    self.run_eval()
            if self.should_log():
                self.accounting.record(self.step, self.tokens_seen)
            if self._stop_agreed(stop_request):  # the end of training saves the checkpoint
                return

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        self._phase = phase
        self.phases_entered += 1

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        documents = self._documents(document_ids)
        if self.engine.name == "deepspeed":
            return self.engine.forward(input_ids, labels, documents)
        return self.model(input_ids, labels, documents)

    def _documents(self, document_ids: torch.Tensor | None) -> Documents | None:
        return None if document_ids is None else Documents(document_ids, self.cfg.data.restart_positions)

    def next_batch(self, loader: TokenWindowLoader) -> dict[str, torch.Tensor]:
        """The next micro-batch: this rank's part of it (its sequence shard under context parallelism)."""
        self.progress += 1
        batch = self.data_feed.deliver(next(loader), self.device)
        if loader is self.train_loader and self.cfg.data.record_windows and self.data_feed.reads:
            self._record_windows(batch["window_ids"])
        local = self.plan.local_batch(batch)
        if self.objective is not None:
            local["loss_units"] = self.objective.pairs_in(batch["labels"], batch["document_ids"])
        elif self.token_weighted:  # counted over whole windows, before a context-parallel split
            local["loss_units"] = (batch["labels"] != IGNORE_INDEX).sum()
        return local

    def loss_weights(self, batches: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], int]:
        """Per micro-batch, the factor that turns its mean loss into its part of the mean over every supervised token
        (or pair) of the global batch (all micro-batches of all data-parallel ranks), undoing the engine's division
        by the accumulation steps and the gradients' averaging over data-parallel ranks; and the global count."""
        counts = torch.stack([b["loss_units"] for b in batches]).to(torch.float64)
        total = counts.sum().reshape(1)
        if self.grid.size("dp") > 1:
            dist.all_reduce(total, group=self.grid.group("dp"))
        if total.item() == 0:
            raise ValueError(f"{self.phase} at step {self.step + 1}: the global batch holds no supervised token or "
                             "pair")
        factor = len(batches) * self.grid.size("dp") / total[0]
        return [(count * factor).to(torch.float32) for count in counts], int(total.item())

    def _record_windows(self, window_ids: torch.Tensor) -> None:
        if self.windows_log is None:
            path = self.run_dir / "windows" / f"rank_{self.grid.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.windows_log = open(path, "a", buffering=1)  # noqa: SIM115 - one line per micro-batch, kept open
        self.windows_log.write(json.dumps({"step": self.step + 1, "windows": window_ids.tolist()}) + "\n")

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; None when it was rolled back instead (train.on_nan=rollback)."""
        started = time.perf_counter()
        self.model.train()
        set_lr(self.engine, lr_at(self.step, self.cfg.train.steps, self.cfg.optim))
        accum = self.cfg.grad_accum_steps
        total_loss = torch.zeros((), device=self.device)
        total_ce = torch.zeros((), device=self.device)
        total_mtp = torch.zeros(self.mtp_depth, device=self.device)
        self.phase = "forward/backward"
        weights, supervised = [1.0] * accum, 0
        total_preference = torch.zeros(len(PREFERENCE_METRICS), device=self.device)
        if self.plan.pipeline is not None:
            self.engine.initialize()
            batches = [self.next_batch(self.train_loader) for _ in range(accum)]
            if self.token_weighted:  # counted by the stages that read labels; the last one weighs its losses
                _, supervised = self.loss_weights(batches)
                self.pipeline_units = max(supervised, 1)
            input_ids = torch.cat([b["input_ids"] for b in batches])
            labels = torch.cat([b["labels"] for b in batches])
            documents = self._documents(torch.cat([b["document_ids"] for b in batches])
                                        if "document_ids" in batches[0] else None)
            depth = self.mtp_depth
            result = self.plan.pipeline.train_step(input_ids, labels, self._pipeline_loss, self.autocast, depth,
                                                   documents)
            total_loss, total_ce, total_mtp = result[0], result[1], result[2:]
            accum = 0
        if self.token_weighted and accum:
            batches = [self.next_batch(self.train_loader) for _ in range(accum)]
            weights, supervised = self.loss_weights(batches)
        for index in range(accum):
            batch = batches[index] if self.token_weighted else self.next_batch(self.train_loader)
            input_ids, labels = batch["input_ids"], batch["labels"]
            if self.objective is not None:
                loss, sums = self._preference_loss(batch)
                total_preference += sums
                parts = {"ce": loss}
            else:
                with self.autocast():
                    logits = self.forward(input_ids, labels, batch.get("document_ids"))
                loss, parts = self.plan.loss(logits, labels, self.cfg.train.label_smoothing, self.cfg.train.z_loss)
            loss, ce = loss * weights[index], parts["ce"] * weights[index]
            if self.mtp_depth and self.objective is None:  # DPO scores replies with the main head only
                total_mtp += torch.stack(self.model.last_mtp_losses).float() / self.cfg.grad_accum_steps
            self.engine.backward(loss, self.cfg.grad_accum_steps)
            total_loss += loss.detach() / self.cfg.grad_accum_steps
            total_ce += ce.detach() / self.cfg.grad_accum_steps
        slow_point()
        compute_seconds = time.perf_counter() - started  # this rank's own work, before it waits for the others
        grad_norm = self.engine.step(self.set_phase)
        skipped = grad_norm is not None and not math.isfinite(grad_norm)
        if grad_norm is None:
            grad_norm = float("nan")  # not reported by this engine
        if skipped and self.cfg.train.on_nan == "rollback":
            self._roll_back(f"step {self.step + 1}: the gradient norm is {grad_norm}")
            return None
        if skipped:
            self._non_finite_step(grad_norm)
        moe_metrics = self._moe_step_end() if self.cfg.model.moe.enabled else {}
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.supervised_tokens_seen += supervised
        self.phase = "metrics all-reduce"
        loss_value, ce_value, *mtp_values = self.mean_over_dp(torch.cat([torch.stack([total_loss, total_ce]),
                                                                         total_mtp])).tolist()
        moe_metrics |= {f"mtp/{depth}": value for depth, value in enumerate(mtp_values, start=1)}
        if not math.isfinite(loss_value) and not skipped:
            raise FloatingPointError(f"loss is {loss_value} at step {self.step}; lower optim.lr or check the data")
        if self.skipped_steps:
            moe_metrics["skipped_steps"] = self.skipped_steps
        if self.objective is not None:
            moe_metrics |= self._preference_metrics(total_preference, supervised)
        if self.grid.shape.world_size > 1 and self.should_log():
            moe_metrics |= self._straggler_metrics(compute_seconds)
        return {
            "loss": loss_value,
            "ce": ce_value,
            "lr": self.engine.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            **({self.units_name: self.supervised_tokens_seen} if self.token_weighted else {}),
            **moe_metrics,
        }

    def _preference_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO: the mean loss over the micro-batch's pairs and its sums of PREFERENCE_METRICS."""
        documents = batch["document_ids"]
        with self.autocast():
            logits = self.forward(batch["input_ids"], None, documents)
            with torch.no_grad():
                reference = self.objective.reference(batch["input_ids"], None, self._documents(documents))
        return self.objective.loss(logits, reference, batch["labels"], documents)

    def _preference_metrics(self, sums: torch.Tensor, pairs: int, prefix: str = "dpo/") -> dict[str, float]:
        """Means over the global batch's pairs."""
        if self.grid.size("dp") > 1:
            dist.all_reduce(sums, group=self.grid.group("dp"))
        return {f"{prefix}{name}": value / pairs for name, value in zip(PREFERENCE_METRICS, sums.tolist(),
                                                                          strict=True)}

    def _straggler_metrics(self, compute_seconds: float) -> dict[str, float]:
        """Collective, on logged steps: every rank's time from the step's start to its gradient reduction (under
        pipeline parallelism, with the schedule's waits); the spread names a slow rank, which a warning reports."""
        self.phase = "straggler check"
        world = self.grid.shape.world_size
        times = torch.empty(world, device=self.device)
        all_gather_dim0(times, torch.tensor([compute_seconds], device=self.device))
        times = times.tolist()
        slowest = max(range(world), key=times.__getitem__)
        skew = times[slowest] - min(times)
        typical = sorted(times)[(world - 1) // 2]
        if self.is_main and skew > max(STRAGGLER_SECONDS, STRAGGLER_SHARE * typical) and (
                self.step - self.straggler_warned >= STRAGGLER_WARN_EVERY):
            self.straggler_warned = self.step
            where = ", ".join(f"{k}={v}" for k, v in coordinates(self.grid.shape, slowest).items())
            print(f"warning: rank {slowest} ({where}) is a straggler at step {self.step}: {times[slowest]:.3f} s of "
                  "work before the gradient "
                  f"reduction against {typical:.3f} s for the median rank (the others wait {skew:.3f} s for it)",
                  flush=True)
        return {"straggler/skew_s": skew, "straggler/slowest_rank": slowest, "straggler/median_s": typical}

    def _roll_back(self, where: str) -> None:
        """train.on_nan=rollback: the newest checkpoint's weights, optimizer state, step and RNG, with the data going
        on from here (the windows read since that checkpoint, the bad ones included, are not read again). Collective:
        the gradient norm is global, so every rank rolls back together."""
        done = self.rollbacks
        if len(done) >= self.cfg.train.max_rollbacks:
            raise FloatingPointError(f"{where} after {len(done)} rollbacks (train.max_rollbacks="
                                     f"{self.cfg.train.max_rollbacks}): lower optim.lr or check the data")
        self.wait_for_checkpoint()
        candidates, _ = self._checkpoint_candidates("auto")
        if not candidates:
            raise FloatingPointError(f"{where}; there is no checkpoint to roll back to yet (train.on_nan=rollback): "
                                     "lower optim.lr, check the data, or save checkpoints earlier")
        at_step = self.step + 1
        loader, skipped, wall = self.train_loader.state_dict(), self.skipped_steps, self.wall_seconds_before
        self._load_checkpoint(candidates[0])
        self.train_loader.load_state_dict(loader)
        self.skipped_steps, self.wall_seconds_before = skipped, wall  # counters of the run, not of the weights
        for layer in self.moe_layers.values():  # this step's loads never reach a bias update
            layer.load_since_update.zero_()
            layer.stats_since_update.zero_()
        self.rollbacks = [*done, {"at_step": at_step, "to_step": self.step}]
        if self.is_main:
            print(f"warning: {where}; rolled back to the checkpoint of step {self.step} ({candidates[0].name}), "
                  f"the data going on ({len(self.rollbacks)} rollback(s) so far, train.max_rollbacks="
                  f"{self.cfg.train.max_rollbacks})", flush=True)

    def _non_finite_step(self, grad_norm: float) -> None:
        """The gradient norm of the step being finished is NaN/inf (the same on every rank)."""
        where = f"step {self.step + 1}: the gradient norm is {grad_norm}"
        last = (f"the last checkpoint is step {self.last_saved_step}" if self.last_saved_step >= 0
                else "no checkpoint yet")
        if self.engine.last_step_applied:
            raise FloatingPointError(f"{where} and DeepSpeed applied the step: the weights are no longer finite and "
                                     f"are not saved ({last}); lower optim.lr or check the data")
        if self.cfg.train.on_nan == "stop":
            raise FloatingPointError(f"{where}; the step was not applied and nothing was saved after it ({last}). "
                                     "Lower optim.lr or check the data, or set train.on_nan=skip to go on")
        self.skipped_steps += 1
        if self.is_main:
            print(f"warning: {where}; the step was skipped (train.on_nan=skip, {self.skipped_steps} so far)",
                  flush=True)

    def _moe_step_end(self) -> dict[str, float]:
        """Per MoE layer: this step's load summed over data- and context-parallel ranks drives the
        auxiliary-loss-free bias update (identical on every rank), and gives the logged statistics."""
        self.phase = "MoE load statistics"
        metrics = self._local_moe_metrics() if self.moe_layers else {}
        merged = self.plan.merged_over_stages(metrics)  # each stage knows its own layers
        self.expert_loads = {k.removeprefix("tokens_per_expert/"): merged.pop(k) for k in sorted(merged)
                             if k.startswith("tokens_per_expert/")}
        return merged

    def _local_moe_metrics(self) -> dict[str, float]:
        layers = self.moe_layers
        loads = torch.stack([layer.load_since_update for layer in layers.values()])
        # per layer, in SUMMED_STATS order: dropped assignments, balance loss, router z-loss, forwards
        extras = torch.stack([layer.stats_since_update for layer in layers.values()])
        if self.grid.size("dp_cp") > 1:
            both = torch.cat([loads.flatten(), extras.flatten()])
            dist.all_reduce(both, group=self.grid.group("dp_cp"))
            loads, extras = both[: loads.numel()].view_as(loads), both[loads.numel():].view_as(extras)
        metrics = {}
        for (index, layer), load, (drop, balance, z, forwards) in zip(layers.items(), loads, extras, strict=True):
            layer.bias_update(load)
            metrics[f"tokens_per_expert/{index}"] = [int(n) for n in load.tolist()]  # written by ExpertLoadLog
            metrics[f"moe/{index}/imbalance"] = float(load.max() / load.mean().clamp(min=1e-9))
            metrics[f"moe/{index}/dropped_share"] = float(drop / load.sum().clamp(min=1))
            if layer.cfg.aux_loss_weight > 0:
                metrics[f"moe/{index}/balance_loss"] = float(balance / forwards.clamp(min=1))
            if layer.cfg.router_z_loss > 0:
                metrics[f"moe/{index}/router_z_loss"] = float(z / forwards.clamp(min=1))
        return metrics

    def _pipeline_loss(self, output, target):
        """The last stage's loss: the main loss, plus the MTP modules' (they live there) when it has them."""
        logits, hidden = output if isinstance(output, tuple) else (output, None)
        loss, parts = self.plan.loss(logits, target, self.cfg.train.label_smoothing, self.cfg.train.z_loss)
        if self.token_weighted:  # this micro-batch's share of the global batch's supervised tokens (see loss_weights)
            weight = (target != IGNORE_INDEX).sum() * self.cfg.grad_accum_steps * self.grid.size("dp") \
                / self.pipeline_units
            loss, parts["ce"] = loss * weight, parts["ce"] * weight
        if hidden is not None:  # reported like the other paths: the main loss, MTP losses apart
            parts["reported_loss"] = loss
            with self.autocast():
                loss = loss + self.model.mtp_loss(hidden, target, self.plan.pipeline.current_documents())
            parts["extra"] = torch.stack(self.model.last_mtp_losses)
        return loss, parts

    def mean_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks (and context-parallel ones, whose losses are shares of their window's)."""
        if self.grid.size("dp_cp") > 1:
            values = values.clone()
            dist.all_reduce(values, group=self.grid.group("dp_cp"))
            values /= self.grid.size("dp_cp")
        return values

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.phase = "evaluation"
        self.model.eval()
        self.val_loader.reset()
        if self.objective is not None:
            return self._evaluate_preference()
        total = torch.zeros((), device=self.device)
        batches = [self.next_batch(self.val_loader) for _ in range(self.cfg.train.eval_batches)]
        # chat data: the mean over every supervised token read, however they fall into batches (as in training)
        weights = self.loss_weights(batches)[0] if self.token_weighted and batches else [1.0] * len(batches)
        signal_point("evaluation", self.step)
        for index, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
            if index and index % EVAL_STOP_POLL == 0 and self.stop_request is not None and self._stop_agreed(
                    self.stop_request):
                return {}  # a stop request cuts the evaluation short: saving comes first
            self.phase = "evaluation"
            if self.plan.pipeline is not None:
                total += weight * self.plan.pipeline.evaluate_batch(
                    batch["input_ids"], batch["labels"], self.plan.loss, self.autocast,
                    self._documents(batch.get("document_ids")),
                )
                continue
            with self.autocast():
                logits = self.forward(batch["input_ids"], document_ids=batch.get("document_ids"))
            _, parts = self.plan.loss(logits, batch["labels"])
            total += weight * parts["ce"]
        val_loss = self.mean_over_dp(total / self.cfg.train.eval_batches).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _evaluate_preference(self) -> dict[str, float]:
        """DPO on held-out pairs: the loss and the metrics, each a mean over all pairs read."""
        batches = [self.next_batch(self.val_loader) for _ in range(self.cfg.train.eval_batches)]
        total = torch.zeros(2, device=self.device)  # summed losses, pairs
        sums = torch.zeros(len(PREFERENCE_METRICS), device=self.device)
        with torch.no_grad():
            for batch in batches:
                loss, batch_sums = self._preference_loss(batch)
                total += torch.stack([loss * batch["loss_units"], batch["loss_units"].float()])
                sums += batch_sums
        if self.grid.size("dp") > 1:
            dist.all_reduce(total, group=self.grid.group("dp"))
        counts = total.tolist()
        metrics = self._preference_metrics(sums, int(counts[1]), prefix="val_")
        return {"val_loss": counts[0] / counts[1], **metrics}

    def run_eval(self) -> None:
        if self.cfg.train.eval_batches == 0:
            return
        result = self.evaluate()
        if not result:
            if self.is_main:
                print(f"evaluation at step {self.step} cut short by the stop request", flush=True)
            return
        self.last_val = result
        self._emit("on_eval", self.last_val)

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "supervised_tokens_seen": self.supervised_tokens_seen,
            "wall_seconds": self.wall_seconds_before + (time.perf_counter() - self.attempt_started),
            "train_loader": self.train_loader.state_dict(),
            "tokenizer": self.train_loader.tokenizer_reference(),
            "last_val": self.last_val,
            "last_train": self.last_train,
            "initialized_from": self.initialized_from,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "data": self.train_loader.data_fingerprint(),
            "skipped_shards": self.train_loader.skipped_shards,
            "accounting": self.accounting.state(),
            **({LORA_BASE: self.lora_base()} if self.cfg.lora.enabled else {}),
        }

    def layout(self) -> dict[str, Any]:
        return checkpoint_layout(self.cfg, self.engine.name)

    def save_checkpoint(self, wait: bool = False) -> Path:
        """Collective: every rank writes its own shards (replicas once) in parallel, rank 0 commits the checkpoint.
        With `train.async_checkpoint` (and not `wait`) it returns once the shards are copied."""
        with self.accounting.charging("checkpoint_save"):
            return self._save_checkpoint(wait)

    def _save_checkpoint(self, wait: bool) -> Path:
        self.wait_for_checkpoint()
        self.phase = "checkpoint save"
        self.accounting.checkpoint_saving(self.step)
        model = {k: v for k, v in self.engine.model_tensors().items() if k not in self.frozen}
        optimizer = self.engine.optimizer_tensors()
        self._refuse_non_finite(model)
        tensors = pieces(model, optimizer, rng_tensors() if self.is_main else None)
        placements = self._placements(tensors, self.engine.fragments())
        asynchronous = self.cfg.train.async_checkpoint and not wait
        self.pending_save = self.checkpoints.save(
            self.step, tensors, self.state(), config_to_yaml(self.cfg), placements, self.layout(),
            self.checkpoint_group, asynchronous,
        )
        self.last_saved_step = self.step
        path = self.pending_save.path
        if not asynchronous:
            self.wait_for_checkpoint()
        return path

    def _refuse_non_finite(self, model: dict[str, torch.Tensor]) -> None:
        """Collective: a checkpoint never holds NaN/inf weights (every rank checks its pieces, all agree)."""
        bad = [name for name, t in model.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        count = torch.tensor([len(bad)], device=self.device)
        if self.grid.shape.world_size > 1:
            dist.all_reduce(count)
        if count.item():
            raise CheckpointError(f"not saving step {self.step}: {int(count.item())} weight tensor(s) hold NaN or inf"
                                  f"{' (here: ' + ', '.join(bad[:4]) + ')' if bad else ''}; the run diverged — "
                                  "resume from the last checkpoint with a lower optim.lr")

    @staticmethod
    def _weight_templates(model: dict[str, torch.Tensor], fragments: dict) -> dict[str, torch.Tensor]:
        """The weights a load reads into: whole pieces, or (ZeRO-3) this rank's ranges of them, 1-D fp32 (none
        where it holds nothing of a weight)."""
        out = {}
        for name, template in model.items():
            if name not in fragments:
                out[name] = template
            elif fragments[name][2] > 0:
                out[name] = torch.empty(fragments[name][2], dtype=torch.float32)
        return out

    def _placements(self, tensors: dict[str, torch.Tensor], fragments: dict | None = None) -> dict:
        """Where each of this rank's checkpoint pieces lies in its full tensor (RNG states are whole). `fragments`:
        {parameter: (its piece's shape, first element, count)} for tensors that are a range of the piece (ZeRO)."""
        out = {}
        for key, t in tensors.items():
            if not key.startswith((MODEL, OPTIMIZER)):
                continue
            name = key.split("/", 1)[1]  # '<parameter>' or '<parameter>/<state>'
            fragment = (fragments or {}).get(name.split("/", 1)[0])
            if fragment is not None and t.dim() > 0:  # not the scalar step count
                shape, start, _ = fragment
                out[key] = Fragment(self.plan.placement(name, shape), shape, start)
            else:
                out[key] = self.plan.placement(name, t.shape)
        return out

    def wait_for_checkpoint(self) -> None:
        """Until the checkpoint being written in the background (if any) is in place."""
        if self.pending_save is None:
            return
        self.phase = "checkpoint save (waiting for the background write)"
        pending, self.pending_save = self.pending_save, None
        with self.accounting.charging("checkpoint_save"):
            path = pending.wait()
        self.accounting.record(self.step, self.tokens_seen)
        self._emit("on_checkpoint", path)

    def _checkpoint_candidates(self, resume: str) -> tuple[list[Path], dict[str, str]]:
        """Rank 0 lists them (for 'auto': every complete checkpoint, most recently written first, and what is wrong
        with the incomplete ones) and every rank gets the lists."""
        choice: list = [None]
        if self.is_main:
            if resume == "auto":
                complete, broken = self.checkpoints.survey()
                choice = [([str(p) for p in reversed(complete)], {p.name: why for p, why in broken.items()})]
            else:
                choice = [([resume], {})]
        if self.grid.shape.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        paths, broken = choice[0]
        return [Path(p) for p in paths], broken

    def resume(self, resume: str) -> dict[str, Any] | None:
        """Continue from a checkpoint; with 'auto', the newest usable one (unusable ones are moved aside with a
        warning). Only a run folder without any checkpoint starts from step 0: if every checkpoint is unusable,
        this stops with what is wrong with each. Returns the accounting ledger the checkpoint holds, if any."""
        with self.accounting.charging("checkpoint_load"):
            return self._resume(resume)

    def _resume(self, resume: str) -> dict[str, Any] | None:
        self.phase = "checkpoint load"
        candidates, problems = self._checkpoint_candidates(resume)
        if not candidates and not problems:
            if self.is_main:
                print(f"no checkpoint under {self.checkpoints.root}: starting from step 0", flush=True)
            return None
        for path in candidates:
            try:
                self._load_checkpoint(path)
                break
            except CheckpointError as exc:  # raised on every rank alike (the shard readers' failures are shared)
                if resume != "auto":
                    raise
                problems[path.name] = str(exc)
                if self.is_main:
                    print(f"warning: {exc}; trying an older checkpoint", flush=True)
        else:
            listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
            raise CheckpointError(f"no usable checkpoint under {self.checkpoints.root} ({listed}). Nothing was "
                                  "changed; move them away or use another --run-dir to start from step 0")
        if self.is_main and resume == "auto":
            for name, why in problems.items():
                if (self.checkpoints.root / name).exists():
                    self.checkpoints.move_aside(self.checkpoints.root / name, why)
        return self.resumed_ledger

    def _model_templates(self) -> dict[str, torch.Tensor]:
        with self.engine.masters_in_model():  # what checkpoints hold: the fp32 masters of bf16 weights
            return model_templates(self.model)

    def _load_checkpoint(self, path: Path) -> None:
        """Collective: each rank reads only its own pieces, whatever layout wrote them."""
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        meta = read_meta(path)
        stored = meta.tensor_shapes()
        model = {k: v for k, v in self._model_templates().items() if k not in self.frozen}
        held = self.plan.merged_over_stages(dict.fromkeys(model, True))  # the names some stage of the layout holds
        unexpected = sorted(k.removeprefix(MODEL) for k in stored if k.startswith(MODEL) and k[len(MODEL):] not in held)
        if unexpected:
            raise CheckpointError(f"{path} does not fit the model: unexpected {unexpected}")
        weight_fragments = self.engine.weight_fragments()
        model = self._weight_templates(model, weight_fragments)
        params = dict(self.model.named_parameters())
        optimizer = {}
        for key, (shape, dtype) in stored.items():
            name = key.removeprefix(OPTIMIZER).rsplit("/", 1)[0]
            if key.startswith(OPTIMIZER) and name in params:  # a state is a scalar (step) or shaped like its param
                local_shape = params[name].shape if shape else ()
                optimizer[key.removeprefix(OPTIMIZER)] = torch.empty(local_shape, dtype=dtype)
        rng = {k.removeprefix(RNG): torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored.items()
               if k.startswith(RNG) and (k == RNG + "torch_cpu" or torch.cuda.is_available())}
        templates = pieces(model, {}, rng)
        loaded = read_pieces(meta, templates, self._placements(templates, weight_fragments))

        def read_optimizer(fragments: dict) -> dict[str, torch.Tensor]:
            """This rank's optimizer tensors: whole pieces, or the ranges `fragments` names (collective)."""
            shaped = {}
            for key, template in optimizer.items():
                fragment = fragments.get(key.rsplit("/", 1)[0])
                if fragment is None or template.dim() == 0:
                    shaped[key] = template
                elif fragment[2] > 0:  # else this rank holds none of it
                    shaped[key] = torch.empty(fragment[2], dtype=template.dtype)
            states = pieces({}, shaped)
            return part(read_pieces(meta, states, self._placements(states, fragments)), OPTIMIZER)

        self.engine.load(part(loaded, MODEL), read_optimizer, path, missing_ok=self.frozen)
        restore_rng(part(loaded, RNG))
        state = meta.state
        self._check_same_data(path, state)
        self.step = meta.step
        self.tokens_seen = state["tokens_seen"]
        self.supervised_tokens_seen = state.get("supervised_tokens_seen", 0)
        self.wall_seconds_before = state["wall_seconds"]
        self.train_loader.load_state_dict(state["train_loader"])
        self.last_val = state.get("last_val", {})
        self.last_train = state.get("last_train", {})
        self.initialized_from = state.get("initialized_from")
        self.skipped_steps = state.get("skipped_steps", 0)
        self.rollbacks = state.get("rollbacks", [])
        self.resumed_ledger = state.get("accounting")
        self.last_saved_step = self.step
        if self.is_main:
            written = meta.layout
            layout = ", ".join(f"{k}={v}" for k, v in written.items() if v is not None)
            print(f"resumed from {path} at step {self.step}" + (f" (written by {layout})" if layout else ""),
                  flush=True)

    def initialize_from(self, path: Path) -> None:
        """Collective: this rank's pieces of another run's weights (any layout wrote them); the optimizer, the
        schedule and the data position stay fresh."""
        with self.accounting.charging("checkpoint_load"):
            self._initialize_from(path)

    def _initialize_from(self, path: Path) -> None:
        self.phase = "initialization from a checkpoint"
        meta = read_meta(path)
        check_initialization_source(meta, self.cfg, self.train_loader.tokenizer_reference())
        model = self._model_templates()
        adapters = frozenset(filter(is_adapter, model))  # new in this phase
        weight_fragments = self.engine.weight_fragments()
        templates = pieces(self._weight_templates({k: v for k, v in model.items() if k not in adapters},
                                                  weight_fragments), {})
        loaded = read_pieces(meta, templates, self._placements(templates, weight_fragments))
        self.engine.load(part(loaded, MODEL), lambda fragments: {}, path, missing_ok=adapters)
        self.initialized_from = {"path": str(meta.path), "step": meta.step}
        if self.is_main:
            changes = model_config_changes(meta.path, self.cfg)
            print(f"initialized from {meta.path} (its step {meta.step}): fresh optimizer, schedule and data position"
                  + (f"; model changes: {', '.join(changes)}" if changes else ""), flush=True)

    def lora_base(self) -> dict[str, Any]:
        """The checkpoint holding the frozen base weights (a LoRA checkpoint holds the adapters only)."""
        base = self.initialized_from or {}
        return {"path": str(Path(base["path"]).resolve()), "step": base["step"]} if base else {}

    def _check_same_data(self, path: Path, state: dict[str, Any]) -> None:
        """The resumed run reads what the checkpoint's run read (its data position means nothing elsewhere)."""
        theirs, ours = state.get("tokenizer"), self.train_loader.tokenizer_reference()
        if theirs and theirs["sha256"] != ours["sha256"]:
            raise CheckpointError(f"{path} was trained with the tokenizer {theirs['path']} (sha256 "
                                  f"{theirs['sha256'][:12]}…), this run's data uses {ours['path']} (sha256 "
                                  f"{ours['sha256'][:12]}…): a different vocabulary cannot continue these weights")
        recorded = state.get("data")
        if recorded is None:  # written before data fingerprints existed
            return
        current = self.train_loader.data_fingerprint()
        key = lambda entries: [(e["weight"], e.get("shards_sha256") or e.get("records_sha256")) for e in entries]  # noqa: E731
        if key(recorded) == key(current):
            return
        was = ", ".join(f"{e['dir']} (weight {e['weight']:g})" for e in recorded)
        now = ", ".join(f"{e['dir']} (weight {e['weight']:g})" for e in current)
        message = f"{path} was trained on other data ({was}) than this run's ({now})"
        if not self.cfg.train.allow_data_change:
            raise CheckpointError(f"{message}: its data position does not apply here. Resume with the same data, or "
                                  "set train.allow_data_change=true to go on (the position counts windows of the "
                                  "new data), or start a new phase with --init-from")
        if self.is_main:
            print(f"warning: {message}; continuing (train.allow_data_change)", flush=True)

    def summary(self, run_seconds: float) -> dict[str, Any]:
        wall = self.wall_seconds_before + run_seconds
        tokens_per_s = self.tokens_seen / wall if wall > 0 else 0.0
        return {
            "steps": self.step,
            "tokens": self.tokens_seen,
            **({self.units_name: self.supervised_tokens_seen} if self.token_weighted else {}),
            "final_train_loss": self.last_train.get("loss"),
            "val_loss": self.last_val.get("val_loss"),
            "val_ppl": self.last_val.get("val_ppl"),
            "validation": self.last_val,
            "wall_seconds": wall,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "num_parameters": self.num_parameters,
            **({"trainable_parameters": self.adapter_parameters} if self.adapter_parameters else {}),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "precision": self.precision.precision,
            "precision_requested": self.precision.requested,
            "precision_reason": self.precision.reason,
            "initialized_from": self.initialized_from,
            "skipped_steps": self.skipped_steps,
            **({"compile_first_step_seconds": self.compile_seconds} if self.compiled_blocks else {}),
            "rollbacks": self.rollbacks,
            "stopped": self.stopped,
            "skipped_shards": self.train_loader.skipped_shards,
            "accounting": self.accounting.ledger.totals(),
        }
