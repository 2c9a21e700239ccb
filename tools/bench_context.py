"""Benchmark: training speed and activation memory against the sequence length, at a fixed number of tokens per
step (the batch shrinks as the windows grow), for the long-context phase's model.

    python -m tools.bench_context [--config configs/tiny_long.yaml] [--lengths 256 512 1024 2048] [--out BENCHMARKS.md]

Activation memory is measured, not estimated: the bytes of every tensor autograd saves for the backward (each
storage once, parameters excluded), which is what grows with the length; with activation checkpointing only the
blocks' inputs are saved. Tokens/s: median of `--repeats` forward + backward passes after a warm-up, fp32, all of
this machine's threads. Context parallelism (which splits these activations over ranks) is not implemented yet.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

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


def main() -> None:
    from pretrain.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_long.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / length)")
    parser.add_argument("--repeats", type=int, default=3)
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
        model.checkpoint_blocks = True
        recomputed = saved_activation_bytes(model, tokens)
        model.checkpoint_blocks = False
        speed = batch * length / seconds
        print(f"seq {length} x {batch}: {speed:,.0f} tokens/s, activations {plain / 2**20:.1f} MiB "
              f"({recomputed / 2**20:.1f} MiB with recomputation)", flush=True)
        rows.append((length, batch, speed, plain, recomputed))
    base_speed, base_bytes = rows[0][2], rows[0][3]
    lines = [f"| {n} | {b} | {s:,.0f} | {s / base_speed:.2f} | {p / 2**20:.1f} | {p / base_bytes:.2f} | "
             f"{r / 2**20:.1f} |" for n, b, s, p, r in rows]
    body = (
        f"`python -m tools.bench_context` — `{args.config}` model, {args.tokens} tokens per step, one forward + "
        f"backward, fp32, median of {args.repeats}; activation memory = bytes autograd saves for the backward.\n\n"
        "| seq | batch | tokens/s | vs shortest | activations MiB | vs shortest | with recomputation MiB |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(lines)
        + "\n\nAt a fixed number of tokens the saved activations do not grow with the length: SDPA's fused kernel "
        "keeps O(seq) per sequence for the backward, never the seq x seq scores, so what grows is compute (the "
        "attention's share of the FLOPs). Context parallelism (splitting each sequence over ranks, for lengths whose "
        "activations overflow one device) is not implemented yet; this table is CP=1."
    )
    write_section(Path(args.out), "bench_context", "Sequence length: speed and activation memory",
                  machine_description(), body)


if __name__ == "__main__":
    main()
