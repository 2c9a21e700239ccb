"""Memory planner: which layouts of a config fit a number of GPUs of a given memory, with each rank's memory by
category and the expected step time.

Parameters per rank are counted exactly, from the whole model's parameter shapes (built on `meta`, no memory) and
the rules by which the parallel plan shards them (tests/parallel/test_memory_plan.py checks them against the real
shards built under a fake process group of the full world size). The bytes per parameter follow the ZeRO paper's
accounting of mixed-precision AdamW (arXiv 1910.02054, K = 12):

    engine                            weights          gradients        optimizer (AdamW moments, fp32 masters)
    plain (ours, fp32 weights)        4                4                8
    plain, train.param_dtype=bf16     2                4 (fp32)         12 (masters 4 + moments 8)
    DeepSpeed ZeRO-s, fp32            4 (/dp if s=3)   4 (/dp if s>=2)  12 (/dp if s>=1)
    DeepSpeed ZeRO-s, bf16            2 (/dp if s=3)   2 (/dp if s>=2)  12 (/dp if s>=1)

(bf16 weights keep embeddings, routers and vectors in fp32: 4 + 4 + 8 for those; parallel/master_weights.py.)
(DeepSpeed keeps its own fp32 copy of the weights it optimizes even when the model is fp32.)

(expert weights are split over their own data-parallel group, `dp / ep`, instead of `dp`; with context
parallelism ZeRO partitions over `dp x cp`). Activations are an
estimate from the tensors one block keeps for its backward (see `activation_bytes`), times the micro-batches a
pipeline stage holds in flight under 1F1B; communication buffers are the gradient buckets. A fixed reserve covers
the CUDA context and allocator fragmentation. Step time: training FLOPs of the global batch over the GPUs' peak
at a stated MFU, plus the pipeline bubble.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from parallel.pipeline.partition import plan_stages, stages_of_rank
from parallel.pipeline.stages import last_stage_holds_embedding
from pretrain.config import Config, ConfigError, validate
from pretrain.model.config import ModelConfig
from pretrain.model.flops import flops_per_token

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL, allocator fragmentation
COLUMN_SPLIT = (".q_proj.", ".o_proj.", ".q_b_proj.", ".kv_b_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")


_SHAPES: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}


def _whole_model_shapes(model_cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of the one-process model (built once per config, on `meta`)."""
    key = repr(model_cfg)
    if key not in _SHAPES:
        with torch.device("meta"):
            model = model_cfg.build()
        _SHAPES[key] = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    return _SHAPES[key]


def local_numel(name: str, shape: tuple[int, ...], cfg: ModelConfig, tp: int, ep: int) -> int:
    """Elements of parameter `name` on one rank: experts split over ep (then their hidden size over tp), the
    vocabulary and the heads/hidden size of the column- and row-parallel projections over tp; norms, routers, MLA's
    down-projections and the MTP projection replicated."""
    n = math.prod(shape)
    if ".experts." in name:
        return n // (ep * tp)
    if name in ("embed.weight", "lm_head.weight") or any(k in name for k in COLUMN_SPLIT):
        return n // tp
    if ".k_proj." in name or ".v_proj." in name:  # one KV head per rank when there are fewer heads than ranks
        return n // tp if cfg.n_kv_heads % tp == 0 else n // cfg.n_kv_heads
    return n


def _stage_holds(name: str, layers: set[int], first: bool, last: bool, cfg: ModelConfig) -> bool:
    if name.startswith("layers."):
        return int(name.split(".")[1]) in layers
    if name.startswith("embed."):
        return first or (last and last_stage_holds_embedding(cfg))
    return last  # final norm, head, MTP modules


@dataclass(frozen=True)
class RankParameters:
    dense: int  # elements of parameters replicated over the data-parallel group
    expert: int  # elements of expert weights split by expert parallelism (replicated over dp / ep ranks)
    kept_fp32: int = 0  # elements that bf16 weights keep in fp32 (embeddings, routers, vectors), of dense

    @property
    def total(self) -> int:
        return self.dense + self.expert


_PARAMETERS: dict[tuple, list[RankParameters]] = {}
_RANGES: dict[tuple, list[range]] = {}


def _stage_ranges(cfg: Config) -> list[range]:
    """The pipeline stages' layer ranges, as the trainer splits them (computed once per model and layout)."""
    m, p = cfg.model, cfg.parallel
    if p.pp == 1:
        return [range(m.n_layers)]
    key = (repr(m), cfg.data.seq_len, p.pp, p.virtual_stages, tuple(p.pp_layers))
    if key not in _RANGES:
        _RANGES[key] = plan_stages(m, cfg.data.seq_len, p.pp, p.virtual_stages, list(p.pp_layers))
    return _RANGES[key]


def _rank_layers(cfg: Config, pp_rank: int) -> tuple[set[int], bool, bool]:
    """(the layers pipeline rank `pp_rank` holds, whether it holds the first stage, whether the last)."""
    p, ranges = cfg.parallel, _stage_ranges(cfg)
    stage_ids = stages_of_rank(pp_rank, p.pp, p.virtual_stages) if p.pp > 1 else [0]
    layers = {i for s in stage_ids for i in ranges[s]}
    return layers, 0 in stage_ids, len(ranges) - 1 in stage_ids


def parameters_per_pipeline_rank(cfg: Config) -> list[RankParameters]:
    """Parameter elements one rank holds, for each pipeline rank (tensor- and expert-parallel ranks hold equal
    amounts)."""
    m, p = cfg.model, cfg.parallel
    key = (repr(m), cfg.data.seq_len, p.tp, p.pp, p.virtual_stages, p.ep, tuple(p.pp_layers))
    if key not in _PARAMETERS:
        _PARAMETERS[key] = _count_parameters(cfg)
    return _PARAMETERS[key]


def _count_parameters(cfg: Config) -> list[RankParameters]:
    m, p = cfg.model, cfg.parallel
    out = []
    for pp_rank in range(p.pp):
        layers, first, last = _rank_layers(cfg, pp_rank)
        dense = expert = kept = 0
        for name, shape in _whole_model_shapes(m):
            if not _stage_holds(name, layers, first, last, m):
                continue
            n = local_numel(name, shape, m, p.tp, p.ep)
            if len(shape) < 2 or name.startswith("embed.") or ".router." in name:
                kept += n
            if ".experts." in name and p.ep > 1:  # without expert parallelism they are ordinary weights
                expert += n
            else:
                dense += n
        out.append(RankParameters(dense, expert, kept))
    return out


@dataclass
class RankMemory:
    parameters: int  # elements
    weights: float  # bytes, by category
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    reserve: float = RESERVE_BYTES

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers + self.reserve


def state_bytes(cfg: Config, params: RankParameters) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes of one rank, by the table in the module docstring."""
    p, ds = cfg.parallel, cfg.deepspeed
    if not ds.enabled and cfg.train.param_dtype == "bf16":
        copied = params.total - params.kept_fp32
        return 2.0 * copied + 4.0 * params.kept_fp32, 4.0 * params.total, 12.0 * copied + 8.0 * params.kept_fp32
    if not ds.enabled:
        return 4.0 * params.total, 4.0 * params.total, 8.0 * params.total
    bf16 = cfg.train.precision == "bf16"
    weight, grad, optim = (2, 2, 12) if bf16 else (4, 4, 12)
    stage = ds.zero_stage
    expert_dp = p.dp // p.ep * p.cp

    def split(elements: int, bytes_each: int, partitioned: bool, over: int) -> float:
        return bytes_each * elements / (over if partitioned else 1)

    out = []
    for bytes_each, partitioned in ((weight, stage >= 3), (grad, stage >= 2), (optim, stage >= 1)):
        out.append(split(params.dense, bytes_each, partitioned, p.dp * p.cp)
                   + split(params.expert, bytes_each, partitioned, expert_dp))
    return out[0], out[1], out[2]


def block_activation_elements(m: ModelConfig, layer: int, tp: int, sequence_parallel: bool, cp: int = 1) -> float:
    """Elements per (local) token that block `layer` keeps for its backward on one tensor-parallel rank, as this
    implementation saves them (tested against autograd's saved-tensor hooks for GQA, MLA, MoE, TP and CP blocks):
    - each of the two norms: its input, reciprocal RMS and normalized input (on the sequence shard with sequence
      parallelism: 2 d + 1 split over tp), and its output as the projections read it (gathered: d);
    - GQA attention, on the rank's heads: queries, keys and values repeated to every query head and the output
      (4 h hd), and the log-sum-exp (h). MLA: the query latent, its norm statistics and a flattened copy
      (3 q_rank + 1) and the key-value latent with the RoPE key (3 kv_rank + rope + 1), replicated; per head
      queries and keys (qk head dim), values and output (v head dim), and the log-sum-exp. A GPU's flash or
      memory-efficient attention keeps no score matrix; on a CPU, MLA's differing query and value head sizes fall
      back to the math kernel, which keeps h x seq more per token (and no log-sum-exp). With context parallelism
      the keys and values are the whole window's (gathered): cp times as many per local token, and the outputs of
      the two query chunks are kept apart from their concatenation (one more output per token);
    - a SwiGLU MLP: gate, up, activated gate and product: 4 f. An MoE layer: the same for each of its top_k
      routed copies and the shared experts, the dispatched inputs and the expert outputs (3 top_k d), router
      scores and routing weights (E + 4 top_k)."""
    d = m.d_model
    sp = tp if sequence_parallel and tp > 1 else 1
    elements = 2 * ((2 * d + 1) / sp + d)
    heads = m.n_heads / tp
    if m.attention == "mla":
        a = m.mla
        latents = 3 * a.q_lora_rank + 1 + 3 * a.kv_lora_rank + a.qk_rope_head_dim + 1
        elements += latents + heads * ((1 + cp) * (a.qk_head_dim + a.v_head_dim) + 1)
        elements += heads * a.v_head_dim if cp > 1 else 0
    else:
        elements += (2 + 2 * cp + (cp > 1)) * heads * m.head_dim + heads
    if m.moe.enabled and layer >= m.moe.first_k_dense:
        e = m.moe
        elements += 4 * (e.top_k + e.num_shared_experts) * e.expert_hidden / tp + 3 * e.top_k * d + e.num_experts
        elements += 4 * e.top_k
    else:
        elements += 4 * m.ffn_dim / tp
    return elements


def block_selective_elements(m: ModelConfig, layer: int, tp: int, sequence_parallel: bool) -> float:
    """Elements per (local) token that block `layer` keeps under selective recomputation (pretrain/model/recompute.py:
    the outputs of its matrix multiplications and fused attention kernels, and its input), on one tensor-parallel
    rank (tested against what the selective policy saves, dense and MoE, with TP and SP):
    - the input (on the sequence shard with sequence parallelism: d split over tp);
    - GQA: queries, keys and values as projected (h hd + 2 kv hd for the rank's heads), the attention output and
      its log-sum-exp (h hd + h), the output projection's (d). MLA: the latents (q_rank, kv_rank + rope), the
      per-head queries (qk head dim) and keys/values (nope + v head dim), the attention output and log-sum-exp, the
      output projection's (d); this assumes a fused attention kernel (a GPU's), which MLA's differing head sizes
      do not get on a CPU (its math kernel's output is then recomputed too);
    - a SwiGLU MLP: gate and up (2 f) and the down projection's output (d). An MoE layer: the router's scores (E),
      the same for each of the top_k routed copies and the shared experts.
    With context parallelism, the same per local token (the gathered keys and values are recomputed)."""
    d = m.d_model
    sp = tp if sequence_parallel and tp > 1 else 1
    heads = m.n_heads / tp
    elements = d / sp
    if m.attention == "mla":
        a = m.mla
        elements += (a.q_lora_rank if a.q_lora_rank else 0) + a.kv_lora_rank + a.qk_rope_head_dim
        elements += heads * (a.qk_head_dim + a.qk_nope_head_dim + 2 * a.v_head_dim + 1) + d
    else:
        kv_heads = m.n_kv_heads / tp if m.n_kv_heads % tp == 0 else 1
        elements += (2 * heads + 2 * kv_heads) * m.head_dim + heads + d
    if m.moe.enabled and layer >= m.moe.first_k_dense:
        e = m.moe
        elements += e.num_experts + e.top_k * (2 * e.expert_hidden / tp + d)
        if e.num_shared_experts:
            elements += 2 * e.num_shared_experts * e.expert_hidden / tp + d
    else:
        elements += 2 * m.ffn_dim / tp + d
    return elements


def activation_bytes(cfg: Config, layers: set[int], last: bool, recompute: str = "none") -> tuple[float, float]:
    """(bytes one micro-batch keeps for the backward in these blocks and the head on the last stage, bytes needed
    at once on top of that: the gradients of the block being back-propagated, and with recomputation its
    recomputed activations). With full recomputation a block keeps only its input; with selective, its
    matrix-multiplication and attention outputs (`block_selective_elements`)."""
    m, p = cfg.model, cfg.parallel
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // p.cp  # this rank's share of each window
    act_bytes = 2 if cfg.train.precision == "bf16" else 4
    sp = p.sequence_parallel and p.tp > 1
    kept, largest_block = 0.0, 0.0
    for layer in layers:
        block = block_activation_elements(m, layer, p.tp, sp, p.cp) * tokens * act_bytes
        largest_block = max(largest_block, block)
        if recompute == "full":
            kept += m.d_model / (p.tp if sp else 1) * tokens * act_bytes
        elif recompute == "selective":
            kept += block_selective_elements(m, layer, p.tp, sp) * tokens * act_bytes
        else:
            kept += block
    if last:  # logits (bf16 under autocast), their fp32 log-softmax and its gradient, over the vocabulary shard
        kept += tokens * m.vocab_size / p.tp * (act_bytes + 8) * (1 + m.mtp_depth)
    return kept, largest_block * (1 if recompute == "none" else 2)


def in_flight_microbatches(cfg: Config, pp_rank: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once: 1F1B keeps pp - rank of them (at most the
    step's micro-batch count); interleaving adds the warm-up chunks (Megatron's 1 + (pp - 1) / (pp * v))."""
    p = cfg.parallel
    if p.pp == 1:
        return 1.0
    held = min(p.pp - pp_rank, cfg.grad_accum_steps)
    if p.virtual_stages > 1:
        held *= 1 + (p.pp - 1) / (p.pp * p.virtual_stages)
    return float(held)


def rank_memory(cfg: Config, recompute: str | None = None) -> tuple[RankMemory, int]:
    """The heaviest rank's memory and its pipeline rank (`recompute`: none, full or selective activation
    recomputation of every block; default: as the config says, `train.activation_checkpointing`)."""
    p = cfg.parallel
    if recompute is None:
        recompute = cfg.train.activation_checkpointing
    best: tuple[RankMemory, int] | None = None
    for pp_rank, params in enumerate(parameters_per_pipeline_rank(cfg)):
        layers, _, last = _rank_layers(cfg, pp_rank)
        weights, grads, optim = state_bytes(cfg, params)
        kept, recomputing = activation_bytes(cfg, layers, last, recompute)
        acts = kept * in_flight_microbatches(cfg, pp_rank) + recomputing
        bucket = (cfg.deepspeed.bucket_mb if cfg.deepspeed.enabled else p.grad_bucket_mb) * 2**20
        memory = RankMemory(params.total, weights, grads, optim, acts, 2.0 * bucket)
        if best is None or memory.total > best[0].total:
            best = (memory, pp_rank)
    assert best is not None
    return best


def step_seconds(cfg: Config, gpus: int, peak_flops: float, mfu: float) -> float:
    """Training FLOPs of one global batch over the GPUs at `mfu` of `peak_flops`, stretched by the pipeline bubble
    ((pp - 1) / (m * v) of the step for 1F1B with m micro-batches and v virtual stages)."""
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    compute = tokens * flops_per_token(cfg.model, cfg.data.seq_len) / (gpus * peak_flops * mfu)
    p = cfg.parallel
    bubble = (p.pp - 1) / (cfg.grad_accum_steps * p.virtual_stages) if p.pp > 1 else 0.0
    return compute * (1 + bubble)


@dataclass
class PlanRow:
    layout: dict[str, int | bool | str]  # tp, pp, virtual_stages, ep, dp, zero_stage, micro_batch_size, sp, recompute
    memory: RankMemory | None
    heaviest_pp_rank: int
    step_seconds: float
    fits: bool
    reason: str = ""
    config: Config | None = field(default=None, repr=False)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


MIN_CONTEXT_SHARD = 4096  # context parallelism is considered only down to shards of this many tokens


def context_parallel_sizes(seq_len: int) -> list[int]:
    """CP sizes worth planning for a window: 1, and powers of two leaving shards of at least MIN_CONTEXT_SHARD."""
    return [1] + [c for c in (2, 4, 8, 16, 32) if seq_len % (2 * c) == 0 and seq_len // c >= MIN_CONTEXT_SHARD]


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int, micro_batches: list[int]) -> list[Config]:
    """Every combination of tp (within a node), cp (long windows only), pp, virtual stages, ep, ZeRO stage and
    micro-batch size whose product of tp x cp x pp x dp is `gpus`; validity is checked separately."""
    m = cfg.model
    out = []
    for tp in [d for d in _divisors(gpus) if d <= gpus_per_node]:
        for cp in [c for c in context_parallel_sizes(cfg.data.seq_len) if (gpus // tp) % c == 0]:
            for pp in [d for d in _divisors(gpus // (tp * cp)) if d <= m.n_layers]:
                dp = gpus // (tp * cp * pp)
                eps = [e for e in _divisors(dp) if m.moe.num_experts % e == 0] if m.moe.enabled else [1]
                virtuals = [1, 2] if pp > 1 else [1]
                for ep in eps:
                    for virtual in virtuals:
                        for zero in (0, 1, 2, 3):
                            for micro in micro_batches:
                                out.append(_with_layout(cfg, tp, pp, dp, ep, virtual, zero, micro, cp))
    return out


def _with_layout(cfg: Config, tp: int, pp: int, dp: int, ep: int, virtual: int, zero: int, micro: int,
                 cp: int = 1) -> Config:
    parallel = dataclasses.replace(
        cfg.parallel, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, virtual_stages=virtual, sequence_parallel=tp > 1,
        pp_schedule="interleaved_1f1b" if virtual > 1 else ("1f1b" if pp > 1 else cfg.parallel.pp_schedule),
        pp_layers=[],
    )
    deepspeed = dataclasses.replace(cfg.deepspeed, enabled=zero > 0 or cfg.deepspeed.enabled, zero_stage=zero)
    train = dataclasses.replace(cfg.train, micro_batch_size=micro)
    return dataclasses.replace(cfg, parallel=parallel, deepspeed=deepspeed, train=train)


def layout_of(cfg: Config) -> dict[str, int | bool]:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "virtual_stages": p.virtual_stages, "ep": p.ep, "dp": p.dp, "cp": p.cp,
            "zero_stage": cfg.deepspeed.zero_stage if cfg.deepspeed.enabled else 0,
            "micro_batch_size": cfg.train.micro_batch_size, "sequence_parallel": p.sequence_parallel}


def evaluate(cfg: Config, gpus: int, gpu_memory: float, peak_flops: float, mfu: float,
             recompute: str = "none") -> PlanRow:
    """One layout: valid for the trainer? its heaviest rank's memory, whether it fits, the step time (a full
    recomputation runs each block's forward twice: 4/3 of the compute; a selective one no matrix multiplication
    twice, which the FLOP count leaves unchanged)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=recompute))
    layout = layout_of(cfg) | {"recompute": recompute}
    try:
        validate(cfg, check_paths=False)
    except ConfigError as exc:
        return PlanRow(layout, None, 0, math.inf, False, f"invalid: {exc}", cfg)
    memory, pp_rank = rank_memory(cfg, recompute)
    seconds = step_seconds(cfg, gpus, peak_flops, mfu) * (4 / 3 if recompute == "full" else 1)
    fits = memory.total <= gpu_memory
    reason = "" if fits else (f"needs {memory.total / GIB:,.1f} GiB on pipeline rank {pp_rank} > "
                              f"{gpu_memory / GIB:,.0f} GiB")
    return PlanRow(layout, memory, pp_rank, seconds, fits, reason, cfg)


RECOMPUTE_ORDER = ("none", "selective", "full")  # among equally fast layouts: a selective one still recomputes some


def plan(cfg: Config, gpus: int, gpu_memory: float, gpus_per_node: int = 8, peak_flops: float = 989e12,
         mfu: float = 0.4, micro_batches: list[int] | None = None) -> list[PlanRow]:
    """Every candidate layout, fitting ones first: fastest first; among equally fast ones (the step time leaves out
    communication) the smaller context-parallel group (its K/V all-gathers are not in the step time), then the lower
    ZeRO stage (fewer collectives per micro-batch), then less recomputation, then the least memory."""
    rows = [evaluate(c, gpus, gpu_memory, peak_flops, mfu, recompute)
            for c in candidate_layouts(cfg, gpus, gpus_per_node, micro_batches or [1, 2, 4])
            for recompute in RECOMPUTE_ORDER]
    return sorted(rows, key=lambda r: (not r.fits, float(f"{r.step_seconds:.6g}"), r.layout["cp"],
                                       r.layout["zero_stage"], RECOMPUTE_ORDER.index(r.layout["recompute"]),
                                       r.memory.total if r.memory else math.inf))
