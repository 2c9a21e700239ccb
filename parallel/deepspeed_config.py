"""DeepSpeed's JSON config, generated from ours: there is no second file to keep in sync.

Everything DeepSpeed needs to behave like the plain engine comes from our config (batch sizes, accumulation,
clipping, precision, ZeRO stage, buckets, offload); `deepspeed.config` may add keys we do not set (e.g.
`"zero_optimization": {"round_robin_gradients": true}` is merged key by key), never replace ours.
"""

from __future__ import annotations

import copy
from typing import Any

# top-level keys we generate -> where their value comes from (for the config error on a conflicting override)
GENERATED_KEYS = {
    "train_batch_size": "train.global_batch_size x parallel.cp",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x parallel.dp)",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision (fp16 is not supported; use bf16)",
    "zero_allow_untested_optimizer": "the engine (a torch AdamW from optim.*)",
    "zero_force_ds_cpu_optimizer": "the engine (a torch AdamW from optim.*)",
    "optimizer": "optim.* (the engine passes its own torch AdamW)",
    "scheduler": "optim.schedule (the trainer sets the learning rate every step)",
    "managed_gradient_accumulation": "parallel.pp (the pipeline schedule accumulates; DeepSpeed steps once)",
}
# zero_optimization keys we generate; others under zero_optimization may be added
GENERATED_ZERO_KEYS = {
    "stage": "deepspeed.zero_stage",
    "reduce_bucket_size": "deepspeed.bucket_mb",
    "allgather_bucket_size": "deepspeed.bucket_mb",
    "offload_optimizer": "deepspeed.offload_optimizer",
}


def generate(cfg) -> dict[str, Any]:
    """The DeepSpeed config for `cfg` (a validated `pretrain.config.Config`)."""
    ds, t = cfg.deepspeed, cfg.train
    bucket = int(ds.bucket_mb * 2**20 // 4)  # elements of fp32
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "contiguous_gradients": True,
        "overlap_comm": False,
    }
    if ds.zero_stage == 3:
        zero |= {"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 0}
    pipelined = cfg.parallel.pp > 1
    if pipelined and cfg.parallel.ep == 1:  # gradients come from the pipeline schedule, not from DeepSpeed's backward
        zero["contiguous_gradients"] = False
    # with expert parallelism they must stay contiguous: only that path reduces expert gradients over the
    # expert-data-parallel group (the other falls back to reducing every gradient over `dp`)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    generated: dict[str, Any] = {
        # DeepSpeed's data-parallel ranks are our data x context ones: to it, each sequence shard is a sample
        "train_batch_size": t.global_batch_size * cfg.parallel.cp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed's default would be 1.0: always explicit
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if pipelined:  # each engine.step() is the boundary: reduce the accumulated grads over DP, then step
        generated["managed_gradient_accumulation"] = False
    extra = copy.deepcopy(dict(ds.config))
    for key, value in extra.pop("zero_optimization", {}).items():
        if key in GENERATED_ZERO_KEYS:
            raise ValueError(f"deepspeed.config.zero_optimization.{key} is generated from "
                             f"{GENERATED_ZERO_KEYS[key]}; set it there instead")
        zero[key] = value
    for key, value in extra.items():
        if key in GENERATED_KEYS:
            raise ValueError(f"deepspeed.config.{key} is generated from {GENERATED_KEYS[key]}; set it there instead")
        generated[key] = value
    return generated
