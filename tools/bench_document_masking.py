"""Benchmark: what document masking costs — a training step (forward + backward) of the tiny config's model with
packed documents masked apart against plain causal attention, in the same run, at several window lengths.

    python -m tools.bench_document_masking [--config configs/tiny.yaml] [--lengths 256 1024] [--out BENCHMARKS.md]

Plain causal attention runs SDPA's `is_causal` path; masking gives SDPA a boolean [batch, 1, seq, seq] mask (causal
and same document), which rules out the flash kernel on GPUs. Documents are cut at random with a mean length of
one eighth of the window. Median of `--repeats` steps after a warm-up, fp32, all of this machine's threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tools.bench_report import machine_description, write_section


def step_seconds(model, tokens, documents, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        model(tokens, documents=documents).float().logsumexp(-1).mean().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    from pretrain.config import load_config
    from pretrain.model import Transformer
    from pretrain.model.documents import Documents

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    cfg = load_config(args.config)
    rows = []
    for length in args.lengths:
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, length)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, length))
        ids = (torch.rand(args.batch, length) < 8 / length).long().cumsum(dim=1)
        causal = step_seconds(model, tokens, None, args.repeats)
        masked = step_seconds(model, tokens, Documents(ids, restart_positions=True), args.repeats)
        print(f"seq {length}: causal {causal * 1e3:.1f} ms, masked {masked * 1e3:.1f} ms", flush=True)
        rows.append(f"| {length} | {args.batch} | {causal * 1e3:.1f} | {masked * 1e3:.1f} | {masked / causal:.2f} |")
    body = (
        f"`python -m tools.bench_document_masking` — `{args.config}` model, one training step (forward + backward), "
        f"fp32, median of {args.repeats}.\n\n| seq | batch | causal ms | document-masked ms | ratio |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )
    write_section(Path(args.out), "bench_document_masking", "Document masking vs plain causal attention",
                  machine_description(), body)


if __name__ == "__main__":
    main()
