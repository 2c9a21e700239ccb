"""Benchmark: per-rank memory of the model states under DeepSpeed ZeRO stages 0-3 against the ZeRO paper's
formulas, and the tokens/s of each stage against our plain data-parallel engine, in one run.

    python -m tools.bench_zero configs/tiny.yaml data.dir=data_cache/tiny [--dp 2] [--steps 6] [--out BENCHMARKS.md]

Each engine runs under torchrun with `--dp` processes (one thread each), the same model, global batch and
precision. Model-state memory is measured where it peaks, at the optimizer step (a pre-hook on the torch AdamW
that both engines end up calling): every tensor alive in the process is found through the garbage collector and
its storage counted once. At that point the backward is over, so what is alive is parameters, gradients
(or their reduced partitions), the optimizer's master weights and moments, and DeepSpeed's buffers.

The paper's formulas (Rajbhandari et al., 2020), Ψ parameters, N_d data-parallel ranks, K bytes of optimizer
state per parameter: stage 0 (2+2+K)Ψ, stage 1 (2+2)Ψ + KΨ/N_d, stage 2 2Ψ + (2+K)Ψ/N_d, stage 3 (2+2+K)Ψ/N_d,
with 2-byte (bf16) parameters and gradients and K=12 (fp32 master weights, momentum, variance). In fp32 the
parameter and gradient bytes are 4 (and DeepSpeed still keeps a separate fp32 master copy).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from tools.bench_report import micro_batch_for_dp, torchrun

ENGINES = ["plain", "zero0", "zero1", "zero2", "zero3"]


def engine_overrides(engine: str) -> list[str]:
    if engine == "plain":
        return ["deepspeed.enabled=false"]
    return ["deepspeed.enabled=true", f"deepspeed.zero_stage={engine[-1]}"]


def layout_overrides(config: str, overrides: list[str], dp: int) -> list[str]:
    """DP over `dp` ranks with the config's global batch: the micro-batch shrinks by dp when it must."""
    micro = micro_batch_for_dp(config, overrides, dp)
    return [f"parallel.dp={dp}", f"train.micro_batch_size={micro}", "tracking.mlflow=false"]


def storages(tensors) -> dict[int, int]:
    """Storage address -> bytes, each storage once."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def live_tensor_storages() -> dict[int, int]:
    import torch

    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                obj.untyped_storage()
                found.append(obj)
        except Exception:  # noqa: BLE001, S112 (objects half torn down, wrapper subclasses without storage)
            continue
    return storages(found)


def model_state_breakdown(model, optimizer) -> dict[str, int]:
    """Bytes per category at the optimizer step: parameters (what the model computes with: for ZeRO-3 its
    partitions), gradients (of the model's and of the optimizer's own tensors), optimizer (master weights and
    AdamW moments), other (every other live tensor: communication buckets, RoPE tables, batches)."""
    import torch

    live = live_tensor_storages()
    model_params = list(model.parameters())
    groups = {
        "params": storages(getattr(p, "ds_tensor", p) for p in model_params),
        "grads": storages([p.grad for p in model_params]
                          + [p.grad for g in optimizer.param_groups for p in g["params"]]),
        "optimizer": storages([p for g in optimizer.param_groups for p in g["params"]]
                              + [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]),
    }
    out, assigned = {}, set()
    for name, found in groups.items():
        mine = {ptr: n for ptr, n in found.items() if ptr not in assigned}
        assigned |= set(mine)
        out[name] = sum(mine.values())
    out["other"] = sum(n for ptr, n in live.items() if ptr not in assigned)
    out["total"] = sum(out.values())
    return out


def paper_bytes(stage: int, psi: int, dp: int, lp_bytes: int, k: int = 12) -> float:
    p, g = lp_bytes * psi, lp_bytes * psi
    o = k * psi
    return {0: p + g + o, 1: p + g + o / dp, 2: p + (g + o) / dp, 3: (p + g + o) / dp}[stage]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from cluster.distributed import init_distributed
    from parallel.grid import GridShape, ProcessGrid
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, *layout_overrides(args.config, args.overrides, args.dp),
                                    *engine_overrides(args.engine)])
    env = init_distributed(cfg.parallel.timeout_s)
    torch.set_num_threads(1)
    grid = ProcessGrid.build(GridShape(dp=args.dp), env.world_size, env.rank)
    trainer = Trainer(cfg, Path(args.run_dir) / str(env.rank), callbacks=[], grid=grid)
    peak = {"total": 0}

    def measure(optimizer, *_):
        gc.collect()
        breakdown = model_state_breakdown(trainer.model, optimizer)
        if breakdown["total"] > peak["total"]:
            peak.update(breakdown)

    handle = trainer.optimizer.register_step_pre_hook(measure)
    for _ in range(2):
        trainer.train_step()
    handle.remove()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    per_rank = [None] * env.world_size
    dist.all_gather_object(per_rank, peak)
    if env.rank == 0:
        record = {"engine": args.engine, "tokens_per_s": args.steps * trainer.tokens_per_step / seconds,
                  "bytes_per_rank": per_rank, "psi": trainer.num_parameters, "precision": cfg.train.precision,
                  "tokens_per_step": trainer.tokens_per_step}
        with open(args.result, "a") as f:
            f.write(json.dumps(record) + "\n")
    dist.destroy_process_group()


def table(records: list[dict], dp: int) -> str:
    base = next(r for r in records if r["engine"] == "plain")
    lp = 2 if base["precision"] == "bf16" else 4
    rows = ["| engine | params + grads + optimizer per rank, measured MB (each) | ZeRO paper formula MB "
            "(bytes/param) | measured / formula | other live tensors MB | tokens/s | vs plain DP |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        rank = max(r["bytes_per_rank"], key=lambda b: b["params"] + b["grads"] + b["optimizer"])
        measured = (rank["params"] + rank["grads"] + rank["optimizer"]) / 1e6
        parts = " + ".join(f"{rank[k] / 1e6:.1f}" for k in ("params", "grads", "optimizer"))
        if r["engine"] == "plain":
            formula, label = 16 * r["psi"], "fp32 params + grads + AdamW: 16"
        else:
            stage = int(r["engine"][-1])
            formula = paper_bytes(stage, r["psi"], dp, lp)
            label = f"stage {stage}: {formula / r['psi']:.1f}"
        rows.append(f"| {'plain DP' if r['engine'] == 'plain' else 'ZeRO-' + r['engine'][-1]} | {measured:,.1f} "
                    f"({parts}) | {formula / 1e6:,.1f} ({label}) | {measured * 1e6 / formula:.2f} "
                    f"| {rank['other'] / 1e6:.1f} | {r['tokens_per_s']:,.0f} "
                    f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per engine")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="runs/bench_zero", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    from pretrain.config import load_config
    from tools.bench_report import machine_description, write_section

    for engine in ENGINES:
        load_config(args.config, [*args.overrides, *layout_overrides(args.config, args.overrides, args.dp),
                                  *engine_overrides(engine)])
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "results.jsonl"
        for engine in ENGINES:
            print(f"== {engine}", flush=True)
            torchrun("tools.bench_zero", args.dp, [
                "--worker", "--engine", engine, "--result", str(result), "--run-dir", str(Path(tmp) / engine),
                "--dp", str(args.dp), "--steps", str(args.steps), args.config, *args.overrides])
        records = [json.loads(line) for line in result.read_text().splitlines()]
    first = records[0]
    body = "\n".join([
        f"Config `{args.config}` {' '.join(args.overrides)}: Ψ = {first['psi'] / 1e6:.2f}M parameters, "
        f"{first['precision']}, DP={args.dp} (one process per rank, one thread each), "
        f"{first['tokens_per_step']:,} tokens/step, {args.steps} timed steps after 2 warm-up steps. Model states "
        "are measured at the optimizer step (every live tensor storage in the process, counted once); the "
        "formulas are the ZeRO paper's with K=12 and 2-byte parameters and gradients (bf16), or 4-byte in fp32. "
        "Plain DP keeps fp32 parameters and autocasts to bf16, so its formula is 4+4+8 bytes per parameter.",
        "",
        table(records, args.dp),
        "",
        "Reading it: parameters and optimizer states follow the formulas exactly (2Ψ bf16 parameters, ZeRO-3 "
        "2Ψ/N_d; 12Ψ of fp32 master weights and moments, stages 1-3 12Ψ/N_d). The differences are gradients: "
        "at the step DeepSpeed holds them in fp32 — stage 0 keeps a whole fp32 accumulation buffer beside the "
        "bf16 gradients (6 bytes/param), stages 2-3 the fp32 gradient of their own partition (4Ψ/N_d where the "
        "paper counts 2Ψ/N_d), and stage 1's bf16 gradients are reduced into its fp32 partition before the "
        "step. 'Other' is what the formulas leave out: communication buckets (ZeRO-3's gather/partition "
        "buffers most), RoPE tables, batches. Tokens/s: on CPU each stage adds DeepSpeed's Python bookkeeping "
        "and more, smaller collectives over gloo; on a GPU cluster its reduce-scatter/all-gather overlap with "
        "compute, and the memory saving is what lets a larger model or batch fit.",
    ])
    write_section(Path(args.out), "bench_zero", "DeepSpeed ZeRO stages (issue 6)", machine_description(), body)
    print(body)


if __name__ == "__main__":
    main()
