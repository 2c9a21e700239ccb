"""Benchmark: the MoE layer against a dense SwiGLU layer of the same active parameters, and the all-to-all volume
of expert parallelism per training step measured against its formula.

    python -m tools.bench_moe configs/tiny_moe.yaml data.dir=data_cache/tiny [--repeats 6] [--out BENCHMARKS.md]

1. One process: forward + backward of one MoE layer (the config's experts, top-k, shared experts) and of a dense
   SwiGLU whose hidden size is the MoE's active hidden size (top_k + shared experts) x expert_hidden, on the
   same tokens, bf16 autocast as in training, alternating ABBA; tokens/s of each and the ratio.
2. EP=2 under torchrun: one real `Trainer` step with `parallel.dp=2 parallel.ep=2`, every collective counted by
   `parallel.comm_volume.CommVolume`. Per MoE layer and micro-batch, expert parallelism exchanges the per-expert
   counts (E elements) and moves every routed assignment's d-vector to its expert's rank and back, forward and
   backward: 2·(N·k + R)·d elements (N tokens of the rank, k experts each, R assignments it received; the
   all-to-all input counts whole, including the share that stays on the rank), 4·N·k·d on average over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tools.bench_report import micro_batch_for_dp, torchrun


def layer_benchmark(cfg, repeats: int) -> dict:
    import torch

    from pretrain.model.moe import MoE, SwiGLU

    m, moe = cfg.model, cfg.model.moe
    hidden = moe.hidden(m.ffn_dim)
    torch.manual_seed(0)
    moe_layer = MoE(m.d_model, m.ffn_dim, moe)
    for p in moe_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = SwiGLU(m.d_model, (moe.top_k + moe.num_shared_experts) * hidden)
    x = torch.randn(cfg.train.micro_batch_size, cfg.data.seq_len, m.d_model)
    tokens = x.shape[0] * x.shape[1]

    def run(layer) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
        return time.perf_counter() - start

    times = {"moe": [], "dense": []}
    run(moe_layer), run(dense)
    for i in range(repeats):
        order = ("moe", "dense") if i % 2 == 0 else ("dense", "moe")
        for name in order:
            times[name].append(run(moe_layer if name == "moe" else dense))
    best = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    active = sum(p.numel() for p in dense.parameters())
    return {"tokens": tokens, "moe_tokens_per_s": tokens / best["moe"], "dense_tokens_per_s": tokens / best["dense"],
            "active_parameters": active, "experts": moe.num_experts, "top_k": moe.top_k,
            "shared": moe.num_shared_experts, "expert_hidden": hidden}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from cluster.distributed import init_distributed
    from parallel.comm_volume import CommVolume
    from parallel.grid import GridShape, ProcessGrid
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, *ep_overrides(args.config, args.overrides)])
    env = init_distributed(cfg.parallel.timeout_s)
    torch.set_num_threads(1)
    grid = ProcessGrid.build(GridShape(dp=2, ep=2), env.world_size, env.rank)
    trainer = Trainer(cfg, Path(args.run_dir) / str(env.rank), callbacks=[], grid=grid)
    trainer.train_step()
    with CommVolume({"ep": grid.group("ep"), "dp": grid.group("dp")}) as volume:
        trainer.train_step()
    per_rank = [None] * env.world_size
    dist.all_gather_object(per_rank, volume.traffic.get(("all_to_all", "ep")).elements)
    if env.rank == 0:
        layers = len(trainer.moe_layers)
        n_tokens = cfg.train.micro_batch_size * cfg.data.seq_len
        micro = cfg.grad_accum_steps
        # MTP depth j sees the sequence minus its last j positions
        tokens = [cfg.train.micro_batch_size * (cfg.data.seq_len - (int(name.split(".")[1]) + 1 if
                                                                    name.startswith("mtp.") else 0))
                  for name in trainer.moe_layers]
        moe = cfg.model.moe
        record = {
            "measured": {f"{op}@{g}": t.elements for (op, g), t in volume.traffic.items()},
            "all_to_all_per_rank": per_rank,
            "expected_all_to_all": micro * sum(4 * n * moe.top_k * cfg.model.d_model + moe.num_experts
                                               for n in tokens),
            "moe_layers": layers, "micro_batches": micro, "tokens_per_micro_batch": n_tokens,
        }
        Path(args.result).write_text(json.dumps(record))
    dist.destroy_process_group()


def ep_overrides(config: str, overrides: list[str]) -> list[str]:
    micro = micro_batch_for_dp(config, overrides, 2)
    return ["parallel.dp=2", "parallel.ep=2", f"train.micro_batch_size={micro}", "tracking.mlflow=false",
            "deepspeed.enabled=false"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="runs/bench_moe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import torch

    from pretrain.config import load_config
    from tools.bench_report import machine_description, write_section

    cfg = load_config(args.config, [*args.overrides, "tracking.mlflow=false"])
    if not cfg.model.moe.enabled:
        raise SystemExit(f"{args.config} has no MoE layers (model.moe.num_experts=0)")
    load_config(args.config, [*args.overrides, *ep_overrides(args.config, args.overrides)])
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    layer = layer_benchmark(cfg, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ep.json"
        torchrun("tools.bench_moe", 2, ["--worker", "--result", str(result), "--run-dir", str(Path(tmp) / "runs"),
                                        args.config, *args.overrides])
        ep = json.loads(result.read_text())
    per_rank = ep["all_to_all_per_rank"]
    a2a = sum(per_rank) / len(per_rank)
    body = "\n".join([
        f"Config `{args.config}` {' '.join(args.overrides)}: {layer['experts']} experts, top-{layer['top_k']}, "
        f"{layer['shared']} shared, expert hidden {layer['expert_hidden']}; {layer['tokens']:,} tokens per "
        f"forward/backward, bf16 autocast, median of {args.repeats} ABBA-alternating runs.",
        "",
        "| layer | active parameters | tokens/s (fwd+bwd) | ratio |",
        "|---|---:|---:|---:|",
        f"| dense SwiGLU, hidden {(layer['top_k'] + layer['shared']) * layer['expert_hidden']} "
        f"| {layer['active_parameters']:,} | {layer['dense_tokens_per_s']:,.0f} | 1.00 |",
        f"| MoE (router, grouped experts, shared expert) | {layer['active_parameters']:,} + router "
        f"| {layer['moe_tokens_per_s']:,.0f} | {layer['moe_tokens_per_s'] / layer['dense_tokens_per_s']:.2f} |",
        "",
        f"Expert parallelism EP=2 (over DP=2), one training step: {ep['moe_layers']} MoE layers (MTP modules' "
        "included, on one position fewer per depth) × "
        f"{ep['micro_batches']} micro-batch(es) × {ep['tokens_per_micro_batch']:,} tokens per rank. All-to-all "
        f"elements measured per rank {', '.join(f'{n:,}' for n in per_rank)} (mean {a2a:,.0f}); formula "
        f"4·N·k·d + E per layer and micro-batch = {ep['expected_all_to_all']:,} "
        f"({'equal' if a2a == ep['expected_all_to_all'] else 'differs'}). A rank sends its N·k assignments and "
        "sends back what it received (R·d, which depends on the routing), forward and backward: per rank "
        "2(N·k + R)·d, whose mean over the group is 4·N·k·d because the R add up to the group's assignments. "
        "Other traffic of the step: " + ", ".join(f"{k} {v:,}" for k, v in sorted(ep["measured"].items())
                                                  if not k.startswith("all_to_all")) + ".",
        "",
        "The MoE layer does the dense layer's arithmetic plus routing (a d×E matmul, top-k, sort by expert) and "
        "the gather/scatter of tokens; on CPU those memory-bound steps are what the ratio measures.",
    ])
    write_section(Path(args.out), "bench_moe", "Mixture-of-Experts layer and expert parallelism (issue 7)",
                  machine_description(), body)
    print(body)


if __name__ == "__main__":
    main()
