"""Benchmark: training speed and activation memory against the sequence length, at a fixed number of tokens per
step (the batch shrinks as the windows grow), for the long-context phase's model.

    python -m tools.bench_context [--config configs/tiny_long.yaml] [--lengths 256 512 1024 2048] [--out BENCHMARKS.md]

Activation memory is measured, not estimated: the bytes of every tensor autograd saves for the backward (each
storage once, parameters excluded), which is what grows with the length; with activation checkpointing only the
blocks' inputs are saved. Tokens/s: median of `--repeats` forward + backward passes after a warm-up, fp32, all of
this machine's threads. With `--cp 2` the same windows are also run split over 2 context-parallel ranks (gloo
processes sharing the machine's threads): tokens/s of the group, and the activations of one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tools.bench_report import machine_description, write_section


def saved_activation_bytes(model, tokens) -> int:
    """Bytes autograd keeps for the backward of one forward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def step_seconds(model, tokens, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(tokens).float().logsumexp(-1).mean().backward()
        if i >= 1:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _context_parallel_rank(rank: int, cp: int, init: str, config: str, lengths: list[int], tokens_per_step: int,
                           repeats: int, threads: int, out: str) -> None:
    """One rank of a CP group: for each length, its tokens/s share and the activations it saves."""
    from parallel.grid import GridShape, ProcessGrid
    from parallel.plan import parallelize
    from pretrain.config import load_config

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=cp)
    grid = ProcessGrid.build(GridShape(cp=cp), cp, rank)
    results = []
    for length in lengths:
        cfg = load_config(config, [f"model.max_seq_len={max(length, 1024)}"], check_paths=False)
        torch.manual_seed(0)
        model = cfg.model.build()
        plan = parallelize(model, grid)
        batch = max(1, tokens_per_step // length)
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, length))
        local = plan.local_batch({"input_ids": tokens})["input_ids"]
        dist.barrier()
        seconds = step_seconds(model, local, repeats)
        results.append({"seconds": seconds, "bytes": saved_activation_bytes(model, local)})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def context_parallel_rows(config: str, lengths: list[int], tokens_per_step: int, repeats: int, cp: int) -> list[dict]:
    """Per length: the CP group's step seconds (its ranks run together) and rank 0's saved activation bytes."""
    threads = max(1, torch.get_num_threads() // cp)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cp.json")
        mp.spawn(_context_parallel_rank, nprocs=cp,
                 args=(cp, os.path.join(tmp, "init"), config, lengths, tokens_per_step, repeats, threads, out))
        return json.loads(Path(out).read_text())


def main() -> None:
    from pretrain.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_long.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / length)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks to compare with (1: none)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    rows = []
    for length in args.lengths:
        cfg = load_config(args.config, [f"model.max_seq_len={max(length, 1024)}"], check_paths=False)
        torch.manual_seed(0)
        model = cfg.model.build()
        batch = max(1, args.tokens // length)
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, length))
        seconds = step_seconds(model, tokens, args.repeats)
        plain = saved_activation_bytes(model, tokens)
        model.train()
        model.recompute = "full"
        recomputed = saved_activation_bytes(model, tokens)
        model.recompute = "none"
        speed = batch * length / seconds
        print(f"seq {length} x {batch}: {speed:,.0f} tokens/s, activations {plain / 2**20:.1f} MiB "
              f"({recomputed / 2**20:.1f} MiB with recomputation)", flush=True)
        rows.append((length, batch, speed, plain, recomputed))
    split = context_parallel_rows(args.config, args.lengths, args.tokens, args.repeats, args.cp) if args.cp > 1 else []
    base_speed, base_bytes = rows[0][2], rows[0][3]
    lines = []
    for i, (n, b, s, p, r) in enumerate(rows):
        line = (f"| {n} | {b} | {s:,.0f} | {s / base_speed:.2f} | {p / 2**20:.1f} | {p / base_bytes:.2f} | "
                f"{r / 2**20:.1f} |")
        if split:
            cp_speed, cp_bytes = b * n / split[i]["seconds"], split[i]["bytes"]
            line += f" {cp_speed:,.0f} | {cp_speed / s:.2f} | {cp_bytes / 2**20:.1f} | {cp_bytes / p:.2f} |"
        print(line, flush=True)
        lines.append(line)
    cp_head = (f" CP={args.cp} tokens/s | vs CP=1 | CP={args.cp} activations per rank MiB | vs CP=1 |"
               if split else "")
    cp_rule = "---|---|---|---|" if split else ""
    body = (
        f"`python -m tools.bench_context` — `{args.config}` model, {args.tokens} tokens per step, one forward + "
        f"backward, fp32, median of {args.repeats}; activation memory = bytes autograd saves for the backward."
        + (f" CP={args.cp}: the same windows split over {args.cp} gloo processes on the same cores "
           f"({max(1, torch.get_num_threads() // args.cp)} thread(s) each; CP=1 uses {torch.get_num_threads()})."
           if split else "") + "\n\n"
        "| seq | batch | tokens/s | vs shortest | activations MiB | vs shortest | with recomputation MiB |"
        + cp_head + "\n|---|---|---|---|---|---|---|" + cp_rule + "\n" + "\n".join(lines)
        + "\n\nAt a fixed number of tokens the saved activations do not grow with the length: SDPA's fused kernel "
        "keeps O(seq) per sequence for the backward, never the seq x seq scores, so what grows is compute (the "
        "attention's share of the FLOPs). Context parallelism splits each window's activations over its ranks (for "
        "lengths whose activations overflow one device): a rank keeps half of everything plus the whole window's "
        "keys and values it gathered (and on CPUs the causal masks of its query chunks), which grow with the length; "
        "on one machine its ranks share the cores, so its speed here shows its overhead, not a gain."
    )
    write_section(Path(args.out), "bench_context", "Sequence length: speed and activation memory",
                  machine_description(), body)


if __name__ == "__main__":
    main()
