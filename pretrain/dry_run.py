"""`pretrain train CONFIG --dry-run`: what a run would be, without running it.

The config has been loaded and validated by then; this builds the model on the meta device (no memory, no
initialisation cost: DeepSeek-V3 takes about a second), checks that its size equals the formula the cost
estimates use, and reports parameters, training FLOPs per token and tokens per step. No process starts, no data
is read (the data folders need not exist) and no run folder is created.
"""

from __future__ import annotations

import torch

from pretrain.config import Config
from pretrain.model.flops import count_parameters, flops_per_token, mtp_parameters


def _n(value: int) -> str:
    return f"{value:,} ({value / 1e9:.2f}B)" if value >= 1e8 else f"{value:,} ({value / 1e6:.2f}M)"


def dry_run_report(cfg: Config) -> list[str]:
    """Lines describing the run; raises RuntimeError if the built model and the parameter formula disagree."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    with torch.device("meta"):
        model = m.build()
    built = sum(param.numel() for param in model.parameters())
    if built != count_parameters(m):
        raise RuntimeError(f"the built model has {built:,} parameters but flops.count_parameters says "
                           f"{count_parameters(m):,}; the formula is out of date")
    total = count_parameters(m, include_mtp=False)
    active = count_parameters(m, active=True, include_mtp=False)
    active_no_embedding = count_parameters(m, include_embedding=False, active=True, include_mtp=False)
    tokens = t.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(m, cfg.data.seq_len)
    attention = f"MLA (kv_lora_rank {m.mla.kv_lora_rank})" if m.attention == "mla" else f"GQA ({m.n_kv_heads} KV heads)"
    moe = f", MoE {m.moe.top_k} of {m.moe.num_experts} experts" if m.moe.enabled else ""
    lines = [
        f"model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, {attention}{moe}, "
        f"vocab {m.vocab_size}, {m.mtp_depth} MTP module(s)",
        f"parameters (without MTP):   {_n(total)}",
        f"activated per token:        {_n(active)}; without the input embedding {_n(active_no_embedding)}",
    ]
    if m.mtp_depth:
        lines.append(f"MTP modules (own weights):  {_n(mtp_parameters(m))}; built model in all {_n(built)}")
    lines += [
        f"training FLOPs per token:   {fpt:.4g} (seq_len {cfg.data.seq_len}); per step {fpt * tokens:.4g}",
        f"tokens per step:            {tokens:,} ({t.global_batch_size} sequences x {cfg.data.seq_len})",
        f"layout: tp={p.tp} pp={p.pp} dp={p.dp} ep={p.ep}" + (f" cp={p.cp}" if p.cp > 1 else "")
        + f" -> {p.world_size} process(es), {cfg.grad_accum_steps} micro-batch(es) of {t.micro_batch_size} per rank "
        "and step" + (f" ({cfg.data.seq_len // p.cp:,} tokens of each window per rank)" if p.cp > 1 else ""),
        "dry run: config valid; no process started, no data read, no run folder created",
    ]
    return lines
