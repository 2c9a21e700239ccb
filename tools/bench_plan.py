"""Benchmark: the memory planner against real training on this machine — each rank's peak resident memory while it
builds the model and trains two steps, against what `pretrain plan` says that rank needs (without the GPU reserve),
at one process (with and without activation checkpointing), TP=2, PP=2 and DeepSpeed ZeRO-1/2/3 with DP=2 (fp32 on
CPU, a dense ~60M-parameter model).

    python -m tools.bench_plan [--out BENCHMARKS.md]

Measured: the process's peak RSS (`ru_maxrss`) minus its RSS just before the trainer is built (after torch,
DeepSpeed and the process group are up), the largest over the ranks. The workers run with glibc's
`MALLOC_MMAP_THRESHOLD_=65536`: every tensor above 64 KiB gets its own mapping, returned to the system when freed,
so the peak RSS follows the peak of live tensors (with glibc's default, freed activations stay in its heap and
fragment it, and RSS grows step after step: 1.3-1.9x the plan here, where a GPU's caching allocator behaves
differently).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

from tools.bench_report import current_rss, machine_description, torchrun, write_section

MODEL = ["model.vocab_size=4096", "model.d_model=768", "model.n_layers=8", "model.n_heads=12", "model.n_kv_heads=4",
         "model.max_seq_len=256", "data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=16",
         "train.precision=fp32", "train.steps=2", "train.eval_batches=0", "train.eval_every=100",
         "train.checkpoint_every=100", "data.num_workers=0", "tracking.mlflow=false", "model.tie_embeddings=false"]
LAYOUTS = {
    "one process": (1, []),
    "one process, activation checkpointing": (1, ["train.activation_checkpointing=true"]),
    "TP=2 (+SP)": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "PP=2": (2, ["parallel.pp=2"]),
    "ZeRO-1 DP=2": (2, ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=1"]),
    "ZeRO-2 DP=2": (2, ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=2"]),
    "ZeRO-3 DP=2": (2, ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=3"]),
}


def worker(data_dir: str, overrides: list[str], out: Path) -> None:
    import torch.distributed as dist

    from cluster.distributed import init_distributed
    from parallel.grid import GridShape, ProcessGrid
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config("configs/tiny.yaml", [*MODEL, f"data.dir={data_dir}", *overrides])
    denv = init_distributed(cfg.parallel.timeout_s)
    if cfg.deepspeed.enabled:
        from parallel.deepspeed_engine import ensure_process_group, import_deepspeed

        import_deepspeed()
        ensure_process_group()
    p = cfg.parallel
    shape = GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep)
    grid = ProcessGrid.build(shape, denv.world_size, denv.rank, p.timeout_s) if denv.world_size > 1 else None
    before = current_rss()
    trainer = Trainer(cfg, Path(out).parent / f"run_{denv.rank}", callbacks=[], grid=grid)
    trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": denv.rank, "measured": peak - before}
    if denv.world_size > 1:
        gathered = [None] * denv.world_size
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if denv.rank == 0:
        out.write_text(json.dumps(gathered))


def planned(overrides: list[str], data_dir: str) -> tuple[float, dict]:
    from parallel.memory_plan import rank_memory
    from pretrain.config import load_config

    cfg = load_config("configs/tiny.yaml", [*MODEL, f"data.dir={data_dir}", *overrides])
    memory, _ = rank_memory(cfg)
    parts = {k: getattr(memory, k) for k in ("weights", "gradients", "optimizer", "activations", "buffers")}
    return sum(parts.values()), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data_cache/tiny")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--work", default="/tmp/bench_plan")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.data, args.worker, Path(args.result))
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the workers; see the module docstring
    rows = []
    for name, (nproc, overrides) in LAYOUTS.items():
        result = Path(args.work) / f"{name.replace(' ', '_').replace('=', '')}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        torchrun("tools.bench_plan", nproc, ["--data", args.data, "--result", str(result), "--worker", *overrides])
        measured = max(r["measured"] for r in json.loads(result.read_text()))
        plan_total, parts = planned(overrides, args.data)
        detail = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in parts.items())
        row = (f"| {name} | {plan_total / 2**20:,.0f} ({detail}) | {measured / 2**20:,.0f} | "
               f"{measured / plan_total:.2f} |")
        print(row, flush=True)
        rows.append(row)
    body = "\n".join([
        "| layout | planned MiB per rank (by category) | measured peak MiB (largest rank) | measured / planned |",
        "|---|---|---|---|",
        *rows,
        "",
        "Model: " + " ".join(MODEL[:6]) + f" ({sys.argv[0]}). Measured = peak RSS minus RSS before the trainer "
        "was built, with glibc's `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors leave the process; planned = "
        "`parallel.memory_plan.rank_memory` without the GPU reserve.",
    ])
    write_section(Path(args.out), "bench_plan", "Memory planner against measured peak memory (issue 14)",
                  machine_description(), body)


if __name__ == "__main__":
    main()
