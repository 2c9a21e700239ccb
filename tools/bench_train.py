"""Benchmark: our training step against a minimal plain-torch loop of the same model, and the loader.

    python -m tools.bench_train configs/tiny.yaml data.dir=data_cache/tiny [--steps 20] [--out BENCHMARKS.md]

In one process and one run it measures, alternating blocks in ABBA order so machine drift hits both alike:
  - ours:      `Trainer.train_step` (loader, schedule, loss module, clipping, accumulation, metrics);
  - reference: a nanoGPT-style loop over the same model and optimizer with batches already in memory;
  - loader:    micro-batches per second of `TokenWindowLoader` alone, against what training consumes.
Results go to a table in BENCHMARKS.md with the machine described, one section per kind of CPU (with native bf16:
AMX or AVX512-BF16; without: AVX2 class, or a newer CPU capped with ONEDNN_MAX_CPU_ISA=AVX2), replaced on each run
on that kind. The config's precision is resolved as in training (`auto`: bf16 only where native).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.hardware import measured_matmul_flops
from pretrain.precision import CpuFeatures
from pretrain.trainer import Trainer
from tools.bench_report import machine_description, write_section


def reference_loop(trainer: Trainer, batches: list[dict], steps: int) -> float:
    """Seconds for `steps` optimizer steps of the bare loop over pre-loaded batches."""
    cfg = trainer.cfg
    model = cfg.model.build()
    model.load_state_dict(trainer.model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused or None)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.precision == "bf16"
           else contextlib.nullcontext())
    accum = cfg.grad_accum_steps
    start = time.perf_counter()
    for step in range(steps):
        for micro in range(accum):
            batch = batches[(step * accum + micro) % len(batches)]
            with amp:
                logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def our_loop(trainer: Trainer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return time.perf_counter() - start


def loader_tokens_per_s(trainer: Trainer, micro_batches: int) -> float:
    loader = trainer.train_loader
    next(loader)
    start = time.perf_counter()
    for _ in range(micro_batches):
        next(loader)
    return micro_batches * trainer.cfg.train.micro_batch_size * trainer.cfg.data.seq_len / (
        time.perf_counter() - start
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per side")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, [*args.overrides, "tracking.mlflow=false"])
    trainer = Trainer(cfg, Path("runs/bench_train"), callbacks=[])
    batches = [next(trainer.train_loader) for _ in range(8)]
    trainer.train_step()  # warm-up for both: allocator, kernels, worker start-up
    reference_loop(trainer, batches, 1)

    tokens = args.steps * trainer.tokens_per_step
    ours, ref = [], []
    for block in range(2 * args.blocks):  # ABBA order, so neither side always runs first
        if block % 2 == (block // 2) % 2:
            ours.append(tokens / our_loop(trainer, args.steps))
        else:
            ref.append(tokens / reference_loop(trainer, batches, args.steps))
    ours_tps, ref_tps = statistics.median(ours), statistics.median(ref)
    loader_tps = loader_tokens_per_s(trainer, 200)
    mfu = lambda tps: tps * trainer.flops_per_token / trainer.peak_flops  # noqa: E731

    rows = [
        "| measurement | tokens/s | MFU | ratio |",
        "|---|---:|---:|---:|",
        f"| reference loop (same model, batches in memory) | {ref_tps:,.0f} | {100 * mfu(ref_tps):.1f}% | 1.00 |",
        f"| our `Trainer.train_step` | {ours_tps:,.0f} | {100 * mfu(ours_tps):.1f}% | {ours_tps / ref_tps:.2f} |",
        f"| loader alone ({cfg.data.num_workers} worker(s)) | {loader_tps:,.0f} | – | "
        f"{loader_tps / ours_tps:.1f}× training's consumption |",
    ]
    body = "\n".join(
        [
            f"Config `{args.config}` {' '.join(args.overrides)}: {trainer.num_parameters / 1e6:.2f}M parameters, "
            f"{trainer.precision.describe()}, {trainer.tokens_per_step:,} tokens/step, median of {args.blocks} "
            f"ABBA-alternating blocks of {args.steps} steps. MFU uses {trainer.flops_per_token / 1e6:.1f} MFLOP/token "
            f"against a measured matmul peak of {trainer.peak_flops / 1e9:.0f} GFLOP/s.",
            "",
            *rows,
        ]
    )
    cpu = CpuFeatures.probe()
    native, _ = cpu.native_bf16()
    body += (f"\n\nMatmul peak on this CPU (1,024², measured): fp32 {measured_matmul_flops(torch.float32) / 1e9:.0f} "
             f"GFLOP/s, bf16 {measured_matmul_flops(torch.bfloat16) / 1e9:.1f} GFLOP/s.")
    section = "bench_train" if native else "bench_train_no_native_bf16"
    title = f"Training step and loader, CPU: {cpu.kind()}"
    write_section(Path(args.out), section, title, machine_description(), body)
    print(body)


if __name__ == "__main__":
    main()
