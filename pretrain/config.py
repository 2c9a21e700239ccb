"""The one typed config tree: YAML file + `section.key=value` overrides, checked before anything starts.

OmegaConf checks keys and types against the dataclasses below; `validate` checks how values fit together.
Every problem is raised as a `ConfigError` that names the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.model.config import ModelConfig, RopeConfig  # noqa: F401  (re-exported)
from pretrain.model.lora import LoraConfig

PRECISIONS = ("auto", "fp32", "bf16")  # train.precision (resolved per device by pretrain/precision.py)
RECOMPUTE_MODES = ("none", "full", "selective")  # train.activation_checkpointing (pretrain/model/recompute.py)


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type, or inconsistent with another."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config error at '{key}': {message}")


@dataclass
class BlendEntry:
    dir: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # A folder written by `pretrain data prepare` (manifest.json, tokenizer.json, shards), or with format chat one
    # written by `pretrain data prepare --format sft` (chat_manifest.json, tokenizer.json, train/val JSONL).
    dir: str = "data_cache/tiny"
    # text: token shards (pretraining). chat: conversations packed into windows, the loss on assistant tokens only,
    # normalized by the supervised tokens of the whole global batch (supervised fine-tuning). preference: pairs of
    # replies from `pretrain data prepare --format dpo`, chosen and rejected side by side in a window (DPO, see dpo).
    format: str = "text"
    # chat: a conversation that breaks the format (or does not fit a window) is an error naming its file and line,
    # or, with this on, skipped and counted.
    skip_invalid_records: bool = False
    # Several prepared folders mixed by weight; when set it replaces `dir`. All must share one tokenizer.
    blend: list[BlendEntry] = field(default_factory=list)
    seq_len: int = 256
    num_workers: int = 1
    # A global batch takes its windows in turn from this many shards read side by side (fewer if there are fewer
    # shards): more mixing across shards, a few more open files. Changing it changes the data order.
    interleave_shards: int = 64
    # Packed windows hold several documents: attention stays inside each (its EOS included), and with
    # restart_positions RoPE counts from each document's start (same logits under RoPE, smaller angles).
    document_masking: bool = False
    restart_positions: bool = False
    # A shard whose checksum or tar structure is bad is an error naming it, or, with this on, skipped and logged.
    skip_corrupt_shards: bool = False
    verify_checksums: bool = True
    # Data accounting: each reading rank appends the global index of every training window it takes, with the step,
    # to RUN_DIR/windows/rank_<r>.jsonl (a step run again after a resume appears again: its last record counts).
    record_windows: bool = False

    def dataset_dirs(self) -> list[tuple[str, float]]:
        if self.blend:
            return [(b.dir, b.weight) for b in self.blend]
        return [(self.dir, 1.0)]


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Max global grad norm; 0 turns clipping off.
    grad_clip: float = 1.0
    # "cosine": warmup then cosine to min_lr; "wsd": warmup, stable, then linear decay over the last `decay_fraction`.
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    # Use torch's fused AdamW kernel when the device supports it (apex's FusedAdam is not needed).
    fused: bool = True


@dataclass
class TrainConfig:
    steps: int = 200
    # Sequences per rank per forward pass, and sequences per optimizer step over all data-parallel ranks.
    micro_batch_size: int = 8
    global_batch_size: int = 16
    # auto: bf16 autocast where the hardware runs bf16 natively (CUDA, CPUs with AMX/AVX512-BF16), else fp32;
    # fp32; bf16 (autocast; on a CPU without native bf16 it works, tens of times slower, with a warning).
    precision: str = "auto"
    # Plain engine, bf16 compute: fp32 keeps fp32 weights (autocast casts them in every forward); bf16 computes with
    # bf16 copies of the matrices and steps fp32 master weights (parallel/master_weights.py; checkpoints hold the
    # masters). DeepSpeed's bf16 mode does this itself.
    param_dtype: str = "fp32"
    seed: int = 1234
    deterministic: bool = True
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    # Activation recomputation of every block (pretrain/model/recompute.py): none; full (a block keeps only its
    # input and runs its forward again in the backward: about 4/3 of the compute); selective (it keeps its matrix
    # multiplications' and attention's outputs and recomputes the rest: no matmul twice). See `pretrain plan`.
    # true/false mean full/none.
    activation_checkpointing: str = "none"
    # torch.compile every transformer block (pretrain/compile.py); the first step includes the compilation.
    compile: bool = False
    # Write checkpoints in the background: the step loop waits only while this rank's shards are copied; the
    # next save (and the end of training) waits for the previous one to be in place.
    async_checkpoint: bool = False
    # Start from another run's weights (a checkpoint folder, any layout): fresh optimizer, schedule and data
    # position; the model config may change what needs no new tensors (RoPE scaling, max_seq_len). A run that
    # resumes from its own checkpoints ignores it. `pretrain train --init-from PATH` sets it.
    init_from: str = ""
    # the multi-token-prediction modules in this phase: train (as in pretraining), freeze (kept unchanged, their
    # loss not computed), drop (left out of this phase's model and its checkpoints)
    mtp: str = "train"
    # A step whose gradient norm is NaN/inf is never applied. stop: end the run with an error (the last checkpoint
    # stays the newest); skip: go on with the next batch, counting it (`skipped_steps` in the metrics and summary);
    # rollback: back to the newest checkpoint's weights and optimizer, the data going on from where it is (the
    # windows since that checkpoint are not read again), at most `max_rollbacks` times (`rollbacks` in the summary).
    on_nan: str = "stop"
    max_rollbacks: int = 3
    # Loss spikes: a step whose loss is more than spike_zscore standard deviations above the mean of the last
    # spike_window steps; max_spikes of them within spike_window steps stop the run with an error listing them.
    # 0: not watched.
    spike_zscore: float = 0.0
    spike_window: int = 50
    max_spikes: int = 3
    # Resuming on other training data than the checkpoint's (other shards or weights, same tokenizer) is an error
    # unless this is set; another tokenizer always is.
    allow_data_change: bool = False


@dataclass
class TrackingConfig:
    mlflow: bool = True
    # Empty: MLFLOW_TRACKING_URI if set, else a sqlite file in the runs folder (parent of the run dir).
    tracking_uri: str = ""
    experiment: str = "pretrain"
    run_name: str = ""
    # MLflow calls are batched: metrics are sent every `flush_every` logged steps.
    flush_every: int = 10
    # A tracking server that does not answer costs training nothing: its data waits and is sent when it answers,
    # tried at most every `retry_every_s`; at the end the run waits up to `end_wait_s` for it, then keeps what is
    # unsent in RUN_DIR/mlflow_pending.json (sent by the next start or `pretrain track sync RUN_DIR`).
    retry_every_s: float = 15.0
    end_wait_s: float = 60.0
    progress_bar: bool = True


@dataclass
class ParallelConfig:
    # Megatron rank order: tensor fastest, then context, data, pipeline. tp * cp * dp * pp = number of processes.
    tp: int = 1
    dp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    # Norms and residual stream sharded along the sequence inside tensor-parallel groups.
    sequence_parallel: bool = False
    # A collective that waits longer than this (e.g. on a dead or stuck rank) fails instead of hanging.
    timeout_s: float = 300.0
    grad_bucket_mb: int = 25
    # Plain engine: each gradient bucket's data-parallel all-reduce starts during the backward, as soon as its
    # gradients are complete (as torch DDP does), instead of all after it. DeepSpeed: deepspeed.config.overlap_comm.
    overlap_grad_reduce: bool = False
    # Plain engine: the dtype of the data-parallel gradient sums: fp32, or bf16 (half the traffic, bf16 rounding
    # of each rank's gradient; the gradients are kept and clipped in their own dtype).
    grad_reduce_dtype: str = "fp32"
    # Pipeline schedule when pp > 1: "1f1b", "interleaved_1f1b" (with virtual_stages > 1) or "gpipe".
    # The micro-batches of one step (global_batch_size / (micro_batch_size * dp)) flow through the pipeline.
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    # Layers per stage (pp * virtual_stages numbers summing to model.n_layers); empty: balanced automatically,
    # counting the embedding on the first stage and the LM head and loss on the last.
    pp_layers: list[int] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp * self.cp


@dataclass
class DeepSpeedConfig:
    # The optimizer engine: off, our own (bucketed DP all-reduce, AdamW); on, DeepSpeed ZeRO over the
    # data-parallel group only (our tensor/pipeline groups are passed to it). Its JSON config is generated
    # from this whole config (batch sizes, precision, clipping); `config` adds DeepSpeed keys we don't set.
    enabled: bool = False
    zero_stage: int = 1  # 0: none, 1: optimizer states, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # optimizer states (and the step) in CPU memory
    bucket_mb: int = 25  # reduce and all-gather bucket size
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceConfig:
    """DPO (`data.format: preference`): the loss on each pair's summed reply log-probabilities against a frozen
    reference, the weights the phase starts from (`train.init_from`)."""

    beta: float = 0.1
    # cDPO: the share of pairs assumed to be labeled the wrong way round (sigmoid loss only), in [0, 0.5)
    label_smoothing: float = 0.0
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def dp_size(self) -> int:
        return self.parallel.dp

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.dp_size)


def _schema_error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    return ConfigError(key, f"{msg} ({origin})")


def _config_chain(path: str | os.PathLike | None) -> list[tuple[Path, Any]]:
    """The YAML file and the files it builds on, base first: a top-level `base: other.yaml` (relative to the file)
    is merged under it, so a phase config states only what changes."""
    chain: list[tuple[Path, Any]] = []
    while path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("<file>" if not chain else "base", f"config file {path} does not exist")
        if any(path.resolve() == seen.resolve() for seen, _ in chain):
            raise ConfigError("base", f"{path} builds on itself (a cycle of base: entries)")
        try:
            conf = OmegaConf.load(path)
        except Exception as exc:  # yaml syntax errors come in several exception types
            raise ConfigError("<file>", f"cannot parse {path}: {exc}") from exc
        base = conf.pop("base", None) if isinstance(conf, DictConfig) else None
        chain.insert(0, (path, conf))
        path = None if base is None else path.parent / str(base)
    return chain


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> Config:
    """Merge the dataclass defaults, the YAML file and `a.b=value` overrides, then validate (`check_paths`: also
    that the data folders exist and fit the model's vocabulary; a dry run on a laptop has no data)."""
    merged = OmegaConf.structured(Config)
    for file_path, file_conf in _config_chain(path):
        try:
            merged = OmegaConf.merge(merged, file_conf)
        except OmegaConfBaseException as exc:
            raise _schema_error(exc, f"in {file_path}") from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "overrides are written as section.key=value")
        key = item.split("=", 1)[0]
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _schema_error(exc, f"from command-line override '{item}'") from exc
        if not key.strip():
            raise ConfigError(item, "empty key in override")
    try:
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _schema_error(exc, "while resolving") from exc
    recompute = cfg.train.activation_checkpointing  # YAML's true/false: the meaning they had before the modes
    cfg.train.activation_checkpointing = {"true": "full", "false": "none"}.get(recompute.lower(), recompute)
    validate(cfg, check_paths=check_paths)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def validate_parallel(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    for name in ("tp", "dp", "pp", "cp", "ep"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    if p.cp > 1:
        _require(cfg.data.seq_len % (2 * p.cp) == 0, "data.seq_len",
                 f"{cfg.data.seq_len} is not divisible by 2 x parallel.cp = {2 * p.cp} (context parallelism splits "
                 f"each window into 2 x cp equal chunks)")
    if p.ep > 1:
        _require(m.moe.enabled, "parallel.ep", "expert parallelism needs an MoE model (model.moe.num_experts > 0)")
        _require(m.moe.num_experts % p.ep == 0, "parallel.ep",
                 f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.ep={p.ep}")
        _require(p.dp % p.ep == 0, "parallel.ep",
                 f"parallel.ep={p.ep} must divide parallel.dp={p.dp}: experts are spread over data-parallel ranks")
        _require(not cfg.deepspeed.enabled or cfg.deepspeed.zero_stage in (1, 2), "parallel.ep",
                 f"expert parallelism with DeepSpeed needs deepspeed.zero_stage=1 or 2 (ZeRO-1/2 reduce and "
                 f"partition the expert weights over the expert-data-parallel group), got {cfg.deepspeed.zero_stage}")
    _require(p.timeout_s > 0, "parallel.timeout_s", "must be positive")
    if p.tp > 1:
        for key, value in (("model.n_heads", m.n_heads), ("model.vocab_size", m.vocab_size),
                           ("model.d_model", m.d_model)):
            _require(value % p.tp == 0, key, f"{value} is not divisible by parallel.tp={p.tp}")
        _require(
            m.ffn_dim % p.tp == 0, "model.ffn_hidden", f"ffn size {m.ffn_dim} is not divisible by parallel.tp={p.tp}"
        )
        _require(
            m.n_kv_heads % p.tp == 0 or p.tp % m.n_kv_heads == 0,
            "model.n_kv_heads",
            f"{m.n_kv_heads} KV heads can neither be split over nor replicated across parallel.tp={p.tp} ranks",
        )
    if p.sequence_parallel and p.tp > 1:
        local = cfg.data.seq_len // p.cp
        _require(local % p.tp == 0, "data.seq_len",
                 f"{cfg.data.seq_len} tokens" + (f" / parallel.cp={p.cp} = {local}" if p.cp > 1 else "")
                 + f" is not divisible by parallel.tp={p.tp} (needed by sequence parallelism)")
        _require(m.dropout == 0, "model.dropout", "sequence parallelism does not support dropout yet; set 0")


ATTENTION_TYPES = ("gqa", "mla")


def validate_rope(rope) -> None:
    from pretrain.model.rope import SCALINGS

    _require(rope.scaling in SCALINGS, "model.rope.scaling", f"must be one of {SCALINGS}, got '{rope.scaling}'")
    _require(rope.theta > 0, "model.rope.theta", "must be positive")
    if rope.scaling == "none":
        return
    _require(rope.factor >= 1, "model.rope.factor", f"must be >= 1 for '{rope.scaling}' scaling, got {rope.factor}")
    _require(rope.original_max_seq_len > 0, "model.rope.original_max_seq_len",
             f"'{rope.scaling}' scaling needs the length the model was trained at (the length before extension)")
    if rope.scaling == "yarn":
        _require(rope.beta_fast > rope.beta_slow > 0, "model.rope.beta_fast",
                 f"YaRN needs beta_fast > beta_slow > 0, got {rope.beta_fast} and {rope.beta_slow}")
        _require(rope.attention_factor >= 0 and rope.mscale >= 0 and rope.mscale_all_dim >= 0,
                 "model.rope.attention_factor", "attention_factor, mscale and mscale_all_dim must be >= 0")
    if rope.scaling == "llama3":
        _require(rope.high_freq_factor > rope.low_freq_factor > 0, "model.rope.high_freq_factor",
                 f"Llama-3 scaling needs high_freq_factor > low_freq_factor > 0, got {rope.high_freq_factor} and "
                 f"{rope.low_freq_factor}")


def validate_attention(cfg: Config) -> None:
    m, a = cfg.model, cfg.model.mla
    _require(m.attention in ATTENTION_TYPES, "model.attention",
             f"'{m.attention}' is not one of {', '.join(ATTENTION_TYPES)}")
    if m.attention != "mla":
        return
    _require(a.q_lora_rank >= 0, "model.mla.q_lora_rank", f"must be >= 0 (0 = a plain q_proj), got {a.q_lora_rank}")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _require(getattr(a, key) > 0, f"model.mla.{key}", f"must be a positive integer, got {getattr(a, key)}")
    _require(a.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim",
             f"{a.qk_rope_head_dim} must be even for RoPE (it rotates pairs)")


def validate_moe(cfg: Config) -> None:
    m, e = cfg.model, cfg.model.moe
    _require(e.num_experts >= 0, "model.moe.num_experts", f"must be >= 0 (0 = dense), got {e.num_experts}")
    if not e.enabled:
        return
    _require(1 <= e.top_k <= e.num_experts, "model.moe.top_k",
             f"must be between 1 and model.moe.num_experts={e.num_experts}, got {e.top_k}")
    _require(e.score_func in ("softmax", "sigmoid"), "model.moe.score_func",
             f"must be 'softmax' or 'sigmoid', got '{e.score_func}'")
    _require(e.n_groups >= 1 and e.num_experts % e.n_groups == 0, "model.moe.n_groups",
             f"{e.num_experts} experts do not split into {e.n_groups} groups")
    _require(1 <= e.topk_groups <= e.n_groups, "model.moe.topk_groups",
             f"must be between 1 and model.moe.n_groups={e.n_groups}, got {e.topk_groups}")
    _require(e.top_k <= e.topk_groups * (e.num_experts // e.n_groups), "model.moe.top_k",
             f"{e.top_k} experts cannot be picked from {e.topk_groups} group(s) of {e.num_experts // e.n_groups}")
    _require(0 <= e.first_k_dense <= m.n_layers, "model.moe.first_k_dense",
             f"must be between 0 and model.n_layers={m.n_layers}, got {e.first_k_dense}")
    for key in ("expert_hidden", "num_shared_experts", "bias_update_rate", "aux_loss_weight", "router_z_loss",
                "capacity_factor"):
        _require(getattr(e, key) >= 0, f"model.moe.{key}", f"must be >= 0, got {getattr(e, key)}")
    _require(e.routed_scaling > 0, "model.moe.routed_scaling", "must be positive")
    hidden = e.hidden(m.ffn_dim)
    _require(hidden % cfg.parallel.tp == 0, "model.moe.expert_hidden",
             f"expert hidden size {hidden} is not divisible by parallel.tp={cfg.parallel.tp} (each expert is split "
             "over the tensor-parallel ranks)")


def validate_mtp(cfg: Config) -> None:
    m = cfg.model
    _require(m.mtp_depth >= 0, "model.mtp_depth", f"must be >= 0 (0 = off), got {m.mtp_depth}")
    _require(m.mtp_weight >= 0, "model.mtp_weight", f"must be >= 0, got {m.mtp_weight}")
    if m.mtp_depth == 0:
        return
    _require(m.mtp_depth < cfg.data.seq_len, "model.mtp_depth",
             f"depth {m.mtp_depth} leaves no positions in sequences of data.seq_len={cfg.data.seq_len}")


def validate_preference(cfg: Config) -> None:
    dpo, p = cfg.dpo, cfg.parallel
    _require(dpo.beta > 0, "dpo.beta", f"must be positive, got {dpo.beta}")
    _require(dpo.loss in ("sigmoid", "ipo"), "dpo.loss", f"must be sigmoid or ipo, got '{dpo.loss}'")
    _require(0 <= dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    _require(dpo.loss == "sigmoid" or dpo.label_smoothing == 0, "dpo.label_smoothing",
             "label smoothing (cDPO) applies to the sigmoid loss only")
    _require(bool(cfg.train.init_from), "train.init_from",
             "DPO starts from a fine-tuned model, whose weights are also the frozen reference: set train.init_from "
             "(or pass --init-from)")
    for key, size in (("cp", p.cp), ("ep", p.ep)):
        _require(size == 1, f"parallel.{key}", "DPO runs under data and tensor parallelism only for now: use "
                 "parallel.dp and parallel.tp")
    _require(not cfg.deepspeed.enabled, "deepspeed.enabled", "DPO runs with the plain engine for now")


def validate_lora(cfg: Config) -> None:
    lora, p = cfg.lora, cfg.parallel
    _require(lora.rank >= 0, "lora.rank", f"must be >= 0 (0: full fine-tuning), got {lora.rank}")
    if not lora.enabled:
        return
    _require(lora.alpha > 0, "lora.alpha", f"must be positive, got {lora.alpha}")
    _require(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    _require(lora.dropout == 0 or p.tp == 1, "lora.dropout",
             "adapter dropout under tensor parallelism needs the same mask on every TP rank (not yet): set 0")
    _require(bool(cfg.train.init_from), "train.init_from",
             "LoRA adapts a trained model whose weights stay frozen: set train.init_from (or pass --init-from)")
    _require(not cfg.deepspeed.enabled, "deepspeed.enabled",
             "LoRA runs with the plain engine (its optimizer holds the adapters only; ZeRO would save little): "
             "set deepspeed.enabled: false")
    import torch

    from pretrain.model.lora import apply_lora

    with torch.device("meta"):
        model = cfg.model.build()
    try:
        apply_lora(model, lora)
    except ValueError as exc:
        raise ConfigError("lora.targets", str(exc)) from None


def validate_deepspeed(cfg: Config) -> None:
    ds = cfg.deepspeed
    if not ds.enabled:
        return
    _require(not (cfg.train.compile and ds.zero_stage == 3), "train.compile",
             "ZeRO-3 gathers each parameter in module hooks, which torch.compile does not trace: use ZeRO-1/2 or "
             "train.compile=false")
    _require(not cfg.parallel.overlap_grad_reduce, "parallel.overlap_grad_reduce",
             "is the plain engine's; DeepSpeed overlaps its own reduction with "
             "deepspeed.config.zero_optimization.overlap_comm: true")
    _require(cfg.train.param_dtype == "fp32", "train.param_dtype",
             "is the plain engine's; with DeepSpeed, train.precision=bf16 already computes with bf16 weights and "
             "keeps fp32 masters in its optimizer")
    _require(cfg.parallel.grad_reduce_dtype == "fp32", "parallel.grad_reduce_dtype",
             "is the plain engine's; DeepSpeed's is deepspeed.config.communication_data_type")
    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {ds.zero_stage}")
    _require(ds.bucket_mb > 0, "deepspeed.bucket_mb", f"must be positive, got {ds.bucket_mb}")
    _require(cfg.parallel.pp == 1 or ds.zero_stage <= 1, "deepspeed.zero_stage",
             f"ZeRO-{ds.zero_stage} partitions gradients during the backward, which the pipeline schedule runs "
             "outside DeepSpeed: with parallel.pp > 1 use ZeRO-0 or ZeRO-1 (as DeepSpeed's own pipeline allows); "
             "ZeRO-2/3 work with tensor x data parallelism")
    _require(not (ds.offload_optimizer and ds.zero_stage == 0), "deepspeed.offload_optimizer",
             "optimizer offload needs deepspeed.zero_stage >= 1")
    from parallel.deepspeed_config import GENERATED_KEYS, GENERATED_ZERO_KEYS

    generated = [(key, GENERATED_KEYS.get(key), f"deepspeed.config.{key}") for key in ds.config]
    zero_extra = ds.config.get("zero_optimization", {})
    _require(hasattr(zero_extra, "items"), "deepspeed.config.zero_optimization", "must be a mapping")
    generated += [(key, GENERATED_ZERO_KEYS.get(key), f"deepspeed.config.zero_optimization.{key}")
                  for key in zero_extra]
    for _, source, full_key in generated:
        _require(source is None, full_key, f"is generated from this config ({source}); set it there instead")


PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")


def validate_pipeline(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    _require(p.pp_schedule in PIPELINE_SCHEDULES, "parallel.pp_schedule",
             f"'{p.pp_schedule}' is not one of {', '.join(PIPELINE_SCHEDULES)}")
    _require(p.virtual_stages >= 1, "parallel.virtual_stages", f"must be >= 1, got {p.virtual_stages}")
    if p.pp_schedule == "interleaved_1f1b":
        _require(p.virtual_stages >= 2, "parallel.virtual_stages",
                 "the interleaved schedule needs at least 2 virtual stages per rank")
    else:
        _require(p.virtual_stages == 1, "parallel.virtual_stages",
                 f"{p.virtual_stages} virtual stages need parallel.pp_schedule=interleaved_1f1b")
    stages = p.pp * p.virtual_stages
    if p.pp == 1:
        _require(not p.pp_layers, "parallel.pp_layers", "set only with pipeline parallelism (parallel.pp > 1)")
        return
    _require(stages <= m.n_layers, "parallel.pp",
             f"{stages} pipeline stages (pp={p.pp} x virtual_stages={p.virtual_stages}) but only "
             f"model.n_layers={m.n_layers} layers")
    if p.virtual_stages > 1 and not p.pp_layers:
        _require(m.n_layers % stages == 0, "parallel.virtual_stages",
                 f"model.n_layers={m.n_layers} is not divisible by pp={p.pp} x virtual_stages={p.virtual_stages}")
    if p.pp_layers:
        _require(len(p.pp_layers) == stages and all(n >= 1 for n in p.pp_layers) and sum(p.pp_layers) == m.n_layers,
                 "parallel.pp_layers",
                 f"{list(p.pp_layers)} must be {stages} positive layer counts (one per stage) summing to "
                 f"model.n_layers={m.n_layers}")
    micro = cfg.grad_accum_steps
    _require(micro >= p.pp, "train.global_batch_size",
             f"{micro} micro-batch(es) per step (global_batch_size / (micro_batch_size x dp)) cannot fill "
             f"{p.pp} pipeline stages; use at least {p.pp}")
    if p.pp_schedule == "interleaved_1f1b":
        _require(micro % p.pp == 0, "train.global_batch_size",
                 f"the interleaved schedule needs the micro-batches per step ({micro}) to be a multiple of pp={p.pp}")


def validate_world_size(cfg: Config, world_size: int) -> None:
    _require(
        cfg.parallel.world_size == world_size,
        "parallel",
        f"tp={cfg.parallel.tp} x cp={cfg.parallel.cp} x dp={cfg.parallel.dp} x pp={cfg.parallel.pp} = "
        f"{cfg.parallel.world_size} processes, but {world_size} were launched; set parallel.dp (or tp) to match",
    )


def validate(cfg: Config, check_paths: bool = True) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for key, value in [
        ("model.vocab_size", m.vocab_size),
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("model.n_kv_heads", m.n_kv_heads),
        ("model.max_seq_len", m.max_seq_len),
        ("data.seq_len", d.seq_len),
        ("train.steps", t.steps),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("train.log_every", t.log_every),
        ("train.eval_every", t.eval_every),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_last", t.keep_last),
        ("tracking.flush_every", cfg.tracking.flush_every),
    ]:
        _require(value > 0, key, f"must be a positive integer, got {value}")
    _require(cfg.tracking.retry_every_s > 0, "tracking.retry_every_s", f"must be > 0, got {cfg.tracking.retry_every_s}")
    _require(cfg.tracking.end_wait_s >= 0, "tracking.end_wait_s", f"must be >= 0, got {cfg.tracking.end_wait_s}")
    _require(
        m.d_model % m.n_heads == 0,
        "model.d_model",
        f"hidden size {m.d_model} is not divisible by model.n_heads={m.n_heads}",
    )
    _require(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        f"model.n_heads={m.n_heads} is not divisible by the number of KV groups {m.n_kv_heads}",
    )
    _require(m.head_dim % 2 == 0, "model.d_model", f"head dim {m.head_dim} must be even for RoPE")
    _require(m.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0 = full attention)")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0 (0 = derive from d_model)")
    validate_rope(m.rope)
    supported = m.rope.max_supported_seq_len(m.max_seq_len)
    _require(
        d.seq_len <= supported,
        "data.seq_len",
        f"sequence length {d.seq_len} is above what the RoPE setup supports ({supported}, model.max_seq_len); "
        "raise model.max_seq_len or configure RoPE scaling",
    )
    validate_attention(cfg)
    validate_moe(cfg)
    validate_mtp(cfg)
    _require(t.on_nan in ("stop", "skip", "rollback"), "train.on_nan",
             f"must be stop, skip or rollback, got '{t.on_nan}'")
    _require(t.on_nan != "skip" or not cfg.deepspeed.enabled, "train.on_nan",
             "skip needs the plain engine: DeepSpeed applies a step whatever its gradient norm (use stop or rollback)")
    _require(t.max_rollbacks >= 0, "train.max_rollbacks", "must be >= 0")
    _require(t.spike_zscore >= 0, "train.spike_zscore", "must be >= 0 (0: loss spikes are not watched)")
    _require(t.spike_window >= 2, "train.spike_window", "must be >= 2")
    _require(t.max_spikes >= 1, "train.max_spikes", "must be >= 1")
    _require(t.on_nan != "rollback" or not cfg.deepspeed.enabled or cfg.deepspeed.zero_stage < 3, "train.on_nan",
             "rollback with DeepSpeed needs deepspeed.zero_stage 0-2 (ZeRO-3's partitioned weights are not restored "
             "in place yet)")
    _require(t.mtp in ("train", "freeze", "drop"), "train.mtp", f"must be train, freeze or drop, got '{t.mtp}'")
    _require(t.mtp != "freeze" or not cfg.deepspeed.enabled, "train.mtp",
             "freeze runs with the plain engine for now (DeepSpeed would partition the frozen modules): use drop")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(d.interleave_shards >= 1, "data.interleave_shards", "must be >= 1")
    _require(d.document_masking or not d.restart_positions, "data.restart_positions",
             "restarting positions per document needs data.document_masking: true")
    _require(d.format in ("text", "chat", "preference"), "data.format",
             f"must be text, chat or preference, got '{d.format}'")
    if d.format != "text":
        _require(d.document_masking, "data.document_masking",
                 f"{d.format} data packs several conversations into a window: set data.document_masking: true")
        _require(not d.blend, "data.blend", f"blending is for text data; {d.format} data reads one folder (data.dir)")
        _require(cfg.parallel.pp == 1 or (d.format == "chat" and cfg.parallel.cp == 1), "parallel.pp",
                 "chat data runs under pipeline parallelism without context parallelism; preference data does not "
                 "run under pipeline parallelism yet")
    if d.format == "preference":
        validate_preference(cfg)
    validate_lora(cfg)
    for i, b in enumerate(d.blend):
        _require(b.weight > 0, f"data.blend[{i}].weight", f"must be positive, got {b.weight}")
        _require(bool(b.dir), f"data.blend[{i}].dir", "must name a prepared data folder")
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
    _require(o.schedule in ("cosine", "wsd"), "optim.schedule", f"must be 'cosine' or 'wsd', got '{o.schedule}'")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
    _require(t.precision in PRECISIONS, "train.precision",
             f"must be one of {', '.join(PRECISIONS)}, got '{t.precision}'")
    _require(t.activation_checkpointing in RECOMPUTE_MODES, "train.activation_checkpointing",
             f"must be one of {', '.join(RECOMPUTE_MODES)} (or true/false), got '{t.activation_checkpointing}'")
    _require(t.param_dtype in ("fp32", "bf16"), "train.param_dtype", f"must be fp32 or bf16, got '{t.param_dtype}'")
    _require(t.param_dtype == "fp32" or t.precision != "fp32", "train.param_dtype",
             "bf16 weights need bf16 compute: set train.precision to bf16 or auto (where auto picks bf16)")
    _require(cfg.parallel.grad_reduce_dtype in ("fp32", "bf16"), "parallel.grad_reduce_dtype",
             f"must be fp32 or bf16, got '{cfg.parallel.grad_reduce_dtype}'")
    _require(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _require(t.z_loss >= 0, "train.z_loss", "must be >= 0")
    _require(t.eval_batches >= 0, "train.eval_batches", "must be >= 0")
    if t.compile:
        import torch

        from pretrain.compile import compiler_problem

        problem = compiler_problem("cuda" if torch.cuda.is_available() else "cpu")
        _require(problem is None, "train.compile", problem or "")
    validate_parallel(cfg)
    per_step = t.micro_batch_size * cfg.dp_size
    _require(
        t.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by train.micro_batch_size ({t.micro_batch_size}) "
        f"x data-parallel size ({cfg.dp_size})",
    )
    validate_pipeline(cfg)
    validate_deepspeed(cfg)
    if check_paths:
        for i, (data_dir, _) in enumerate(d.dataset_dirs()):
            key = f"data.blend[{i}].dir" if d.blend else "data.dir"
            manifest = Path(data_dir) / {"chat": "chat_manifest.json", "preference": "preference_manifest.json"}.get(
                d.format, "manifest.json")
            prepare = {"chat": f"pretrain data prepare --format sft --out {data_dir} --tokenizer T",
                       "preference": f"pretrain data prepare --format dpo --out {data_dir} --tokenizer T"}.get(
                d.format, f"pretrain data prepare --out {data_dir}")
            _require(manifest.is_file(), key, f"data folder '{data_dir}' has no {manifest.name}; run `{prepare}` first")
            try:
                tokenizer_vocab = int(json.loads(manifest.read_text())["vocab_size"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(key, f"{manifest} is not a valid manifest: {exc!r}") from exc
            _require(
                m.vocab_size >= tokenizer_vocab,
                "model.vocab_size",
                f"{m.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}) in {manifest}",
            )
        if t.init_from:
            _require((Path(t.init_from) / "meta.json").is_file(), "train.init_from",
                     f"'{t.init_from}' is not a checkpoint folder (no meta.json), e.g. "
                     "runs/tiny/checkpoints/step_00000240")
