"""Benchmark: tokens/s of tensor and data parallelism against one process on the same machine, and the
communication each rank does per step, measured against Megatron's formula.

    python -m tools.bench_parallel configs/tiny.yaml data.dir=data_cache/tiny [--steps 8] [--out BENCHMARKS.md]

Each layout (1 process; TP=2; TP=2 with sequence parallelism; DP=2 with the gradient average after the backward
and overlapped with it; more with --layouts) runs under torchrun
with the machine's cores split evenly between its processes, the same global batch and model. After warm-up it
times `--steps` training steps of the real `Trainer`, then counts one step's collectives with
`parallel.comm_volume.CommVolume` and compares them with `parallel.expected_traffic`. Rank 0 of each layout
writes a JSON line; the parent writes the table to BENCHMARKS.md (its own section, replaced on each run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tools.bench_report import torchrun

DEFAULT_LAYOUTS = ["tp=1,dp=1", "tp=2,dp=1", "tp=2,dp=1,sp", "tp=1,dp=2", "tp=1,dp=2,overlap"]


def parse_layout(text: str) -> dict:
    out = {"tp": 1, "dp": 1, "sp": False, "overlap": False}
    for part in text.split(","):
        if part in ("sp", "overlap"):  # sequence parallelism; data-parallel reduction during the backward
            out[part] = True
        else:
            key, value = part.split("=")
            out[key] = int(value)
    return out


def layout_overrides(config: str, overrides: list[str], layout: dict) -> list[str]:
    """The layout, with the micro-batch shrunk by the DP size so every layout has the same global batch and the
    same number of micro-batches per step as the single process."""
    from pretrain.config import load_config

    base = load_config(config, [*overrides, "tracking.mlflow=false"])
    micro = base.train.micro_batch_size // layout["dp"]
    if micro * layout["dp"] != base.train.micro_batch_size:
        raise SystemExit(f"train.micro_batch_size={base.train.micro_batch_size} does not split over dp={layout['dp']}")
    return [f"parallel.tp={layout['tp']}", f"parallel.dp={layout['dp']}",
            f"parallel.sequence_parallel={str(layout['sp']).lower()}", f"train.micro_batch_size={micro}",
            f"parallel.overlap_grad_reduce={str(layout['overlap']).lower()}",
            "tracking.mlflow=false"]


def worker(args: argparse.Namespace) -> None:
    import torch

    from cluster.distributed import init_distributed
    from parallel.comm_volume import CommVolume
    from parallel.expected_traffic import (
        as_measured,
        data_parallel_elements,
        megatron_layer_elements,
        shared_kinds,
        tensor_parallel_elements,
    )
    from parallel.grid import GridShape, ProcessGrid
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    layout = parse_layout(args.layout)
    cfg = load_config(args.config, [*args.overrides, *layout_overrides(args.config, args.overrides, layout)])
    env = init_distributed(cfg.parallel.timeout_s)
    grid = None
    if env.world_size > 1:
        grid = ProcessGrid.build(GridShape(tp=layout["tp"], dp=layout["dp"]), env.world_size, env.rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    trainer = Trainer(cfg, Path(args.run_dir) / str(env.rank), callbacks=[], grid=grid)
    sync_seconds: list[float] = []  # the gradient sync after the backward: communication not hidden behind it
    sync = trainer.plan.sync_grads

    def timed_sync(model) -> None:
        started = time.perf_counter()
        sync(model)
        sync_seconds.append(time.perf_counter() - started)

    trainer.plan.sync_grads = timed_sync
    for _ in range(2):
        trainer.train_step()
    sync_seconds.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    groups = {k: trainer.grid.group(k) for k in ("tp", "dp", "model")}
    with CommVolume(groups) as volume:
        trainer.train_step()
    local_params = sum(p.numel() for p in trainer.model.parameters())
    expected = {}
    if layout["tp"] > 1:
        expected.update(tensor_parallel_elements(cfg, layout["dp"]))
    if layout["dp"] > 1:
        expected.update(data_parallel_elements(local_params))
    expected = as_measured(expected, shared_kinds(groups))  # kinds with the same members share one group
    if env.rank == 0:
        record = {
            "layout": args.layout,
            "processes": env.world_size,
            "threads_per_process": torch.get_num_threads(),
            "tokens_per_s": args.steps * trainer.tokens_per_step / seconds,
            "step_ms": 1000 * seconds / args.steps,
            "grad_sync_ms": 1000 * sum(sync_seconds) / len(sync_seconds),
            "measured": {f"{op}@{g}": vars(t) for (op, g), t in volume.traffic.items()},
            "expected_elements": expected,
            "megatron_layer_elements": megatron_layer_elements(cfg, layout["dp"]) if layout["tp"] > 1 else 0,
            "num_parameters": trainer.num_parameters,
            "tokens_per_step": trainer.tokens_per_step,
            "precision": cfg.train.precision,
        }
        with open(args.result, "a") as f:
            f.write(json.dumps(record) + "\n")
    if env.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def run_layout(layout_text: str, args: argparse.Namespace, result: Path, run_dir: Path) -> None:
    layout = parse_layout(layout_text)
    nproc = layout["tp"] * layout["dp"]
    torchrun("tools.bench_parallel", nproc, ["--worker", "--layout", layout_text, "--result", str(result),
                                             "--run-dir", str(run_dir / layout_text), "--steps", str(args.steps),
                                             args.config, *args.overrides], one_thread=False)


def fmt_elements(n: float) -> str:
    return f"{n:,}" if n < 10_000 else f"{n / 1e6:.3f}M"


def table(records: list[dict]) -> str:
    base = next(r for r in records if r["processes"] == 1)["tokens_per_s"]
    rows = [
        "| layout | processes × threads | tokens/s | vs 1 process | step ms | gradient sync after the backward, "
        "ms/step | per-rank traffic per step (measured) | MB sent per rank (ring) | expected elements "
        "| Megatron 4·L·b·s·h·m |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in records:
        measured = ", ".join(f"{k} {fmt_elements(v['elements'])}" for k, v in sorted(r["measured"].items())) or "–"
        sent = sum(v["bytes_sent"] for v in r["measured"].values()) / 1e6
        got = {k: v["elements"] for k, v in r["measured"].items()}
        expected = r["expected_elements"]
        verdict = ("exactly as expected" if got == expected
                   else "differs: " + ", ".join(f"{k} {fmt_elements(v)}" for k, v in sorted(expected.items())))
        layer = fmt_elements(r["megatron_layer_elements"]) if r["megatron_layer_elements"] else "–"
        rows.append(
            f"| {r['layout']} | {r['processes']} × {r['threads_per_process']} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s'] / base:.2f} | {r['step_ms']:.0f} | {r['grad_sync_ms']:.1f} "
            f"| {measured} | {sent:.1f} | {verdict if expected else '–'} | {layer} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per layout")
    parser.add_argument("--layouts", nargs="*", default=DEFAULT_LAYOUTS, help="e.g. tp=2,dp=1,sp")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="runs/bench_parallel", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    from pretrain.config import load_config
    from tools.bench_report import machine_description, write_section

    for layout in args.layouts:  # every layout's config is valid before anything is launched
        extra = layout_overrides(args.config, args.overrides, parse_layout(layout))
        load_config(args.config, [*args.overrides, *extra])
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "results.jsonl"
        for layout in args.layouts:
            print(f"== {layout}", flush=True)
            run_layout(layout, args, result, Path(tmp) / "runs")
        records = [json.loads(line) for line in result.read_text().splitlines()]
    first = records[0]
    body = "\n".join([
        f"Config `{args.config}` {' '.join(args.overrides)}: {first['num_parameters'] / 1e6:.2f}M parameters, "
        f"{first['precision']}, {first['tokens_per_step']:,} tokens/step (same global batch in every layout), "
        f"{args.steps} timed steps after 2 warm-up steps; the cores are split evenly between a layout's processes. "
        "Traffic is counted in tensor elements per rank for one optimizer step by `parallel.comm_volume` "
        "(all-gather: the gathered tensor; reduce-scatter: the full input) and compared with "
        "`parallel.expected_traffic`: Megatron's 4 activation all-reduces of b·s·h per layer and micro-batch "
        "(SP: all-gather + reduce-scatter of the same size), plus the embedding/LM-head entries, 3 per-token "
        "loss scalars, SP norm grads and the grad-norm scalar; DP all-reduces every local gradient once. "
        "\"MB sent\" converts the payloads with the ring factors (all-reduce 2(n−1)/n, the others (n−1)/n). "
        "\"Gradient sync after the backward\" is the step's wait in `ParallelPlan.sync_grads` (TP sums, the DP "
        "average, or with `overlap` only what is still in flight of the buckets started during the backward): the "
        "communication not hidden behind computation.",
        "",
        table(records),
        "",
        "Speed: with only a few cores, no layout can split the work over more hardware than the single process "
        "already uses; the ratios show what the collectives (gloo over loopback) cost, and that several "
        "single-threaded processes can use the cores better than one process with several threads on small "
        "matrices. On GPUs each process has its own device and the same code scales the arithmetic.",
    ])
    write_section(Path(args.out), "bench_parallel", "Tensor and data parallelism (issue 4)", machine_description(),
                  body)
    print(body)


if __name__ == "__main__":
    main()
