"""Benchmark: peak resident memory of one rank while it builds and shards a model, the sharded way (built on
`meta`, parallelized there, only this rank's shards materialized; under ZeRO-3 each unit partitioned by DeepSpeed's
zero.Init as it is filled) against the whole-model way (every rank builds and initializes the whole model, then
cuts its shard, or DeepSpeed partitions it whole: what the trainer did before).

    python -m tools.bench_init [--out BENCHMARKS.md]

Each measurement runs in a fresh process acting as rank 0 of the layout under torch's fake process group (building
and sharding need no communication), so its peak RSS (`ru_maxrss`) belongs to that build alone; the resident
memory before building (the interpreter, torch, and the code a first build on `meta` imports) is subtracted. The
model is dense, ~0.3B parameters (fp32).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from tools.bench_report import current_rss, machine_description, write_section

MODEL = ["model.vocab_size=32768", "model.d_model=1024", "model.n_layers=24", "model.n_heads=16", "model.n_kv_heads=8",
         "model.max_seq_len=1024", "data.seq_len=1024", "model.tie_embeddings=false", "train.micro_batch_size=1",
         "train.global_batch_size=4"]
LAYOUTS = {"one process": [], "TP=2": ["parallel.tp=2"], "PP=2": ["parallel.pp=2"],
           "ZeRO-3 DP=2": ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=3"]}


def measure(layout: list[str], sharded: bool) -> dict:
    """In this process: rank 0 of `layout` builds and shards the model; bytes of its peak RSS above the start."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.grid import GridShape, ProcessGrid
    from parallel.materialize import materialize
    from parallel.plan import PipelineOptions, parallelize
    from pretrain.config import load_config

    cfg = load_config(None, [*MODEL, *layout], check_paths=False)
    p = cfg.parallel
    shape = GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep)
    dist.init_process_group("fake", rank=0, world_size=shape.world_size, store=FakeStore())
    grid = ProcessGrid.build(shape, shape.world_size, 0)
    pipeline = PipelineOptions(seq_len=cfg.data.seq_len, micro_batch_size=1, n_microbatches=cfg.grad_accum_steps)
    partition = None
    if cfg.deepspeed.enabled:  # ZeRO-3: DeepSpeed's zero.Init partitions the weights over the data-parallel ranks
        from parallel.deepspeed_engine import ZeroInitPartitioner, import_deepspeed

        import_deepspeed()
    with torch.device("meta"):  # the first build on `meta` imports ~75 MB of code (sympy...): not the model's
        cfg.model.build()
    before = current_rss()
    torch.manual_seed(0)
    if sharded:
        with torch.device("meta"):
            model = cfg.model.build()
        rules = model.init_rules()
        plan = parallelize(model, grid, False, 25, pipeline)
        if cfg.deepspeed.enabled:
            partition = ZeroInitPartitioner(plan, cfg)  # each unit as it is filled
        materialize(model, plan, rules, 0, torch.device("cpu"), partition)
    else:
        model = cfg.model.build()
        plan = parallelize(model, grid, False, 25, pipeline)
        if cfg.deepspeed.enabled:  # the whole model at once, as deepspeed.initialize converts it
            ZeroInitPartitioner(plan, cfg)(list({id(t): t for t in model.parameters()}.values()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.device("meta"):
        whole = cfg.model.build()
    params = {id(t): getattr(t, "ds_tensor", t) for t in model.parameters()}  # ZeRO-3: its partition
    return {
        "peak_bytes": peak - before,
        "shard_bytes": sum(t.numel() * t.element_size() for t in params.values()),
        "model_bytes": sum(t.numel() * 4 for t in whole.parameters()),
        "largest_tensor_bytes": max(t.numel() * 4 for t in whole.parameters()),
        "parameters": sum(t.numel() for t in whole.parameters()),
    }


def run_child(layout: str, sharded: bool) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_init", "--child", layout, "--sharded" if sharded else "--whole"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(LAYOUTS[args.child], args.sharded)))
        return

    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    rows = ["| layout (rank 0) | whole model, then cut: peak | sharded init: peak | ratio | this rank's shard "
            "| shard + largest tensor | peak within it |", "|---|---:|---:|---:|---:|---:|---|"]
    one = None
    for name in LAYOUTS:
        whole, sharded = run_child(name, sharded=False), run_child(name, sharded=True)
        one = one or sharded
        bound = sharded["shard_bytes"] + sharded["largest_tensor_bytes"]
        rows.append(f"| {name} | {gib(whole['peak_bytes'])} GiB | {gib(sharded['peak_bytes'])} GiB | "
                    f"{sharded['peak_bytes'] / whole['peak_bytes']:.2f} | {gib(sharded['shard_bytes'])} GiB | "
                    f"{gib(bound)} GiB | {'yes' if sharded['peak_bytes'] <= bound * 1.05 else 'no'} |")
        print(rows[-1], flush=True)
    body = "\n".join([
        f"Dense model of {one['parameters'] / 1e6:.0f}M parameters ({gib(one['model_bytes'])} GiB in fp32; largest "
        f"tensor {gib(one['largest_tensor_bytes'])} GiB), built and sharded by rank 0 of each layout in a fresh "
        "process (fake process group), peak RSS above the process's RSS before building (after a first build on "
        "`meta`, which imports ~75 MB of code). 'Within it' allows 5% "
        "for allocator slack. ZeRO-3: the whole way builds the model and lets DeepSpeed partition it at once (as "
        "`deepspeed.initialize` did); the sharded way hands each unit (a block, the embedding) to `zero.Init` as "
        "soon as it is filled, and the rank's shard is its partition of every weight.", "", *rows])
    write_section(Path(args.out), "bench_init", "Sharded initialization: memory per rank while building (issue 14)",
                  machine_description(), body)
    print(body)


if __name__ == "__main__":
    main()
