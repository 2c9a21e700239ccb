"""Benchmark: activation recomputation (`train.activation_checkpointing`: none, full, selective) — the activation
memory kept for the backward and the time of a forward + backward, for the dense and the MoE tiny models.

    python -m tools.bench_recompute [--batch 8] [--repeats 5] [--out BENCHMARKS.md]

Kept memory is measured, not estimated: the bytes of every tensor autograd saves outside recomputed blocks
(saved-tensor hooks), plus what recomputed blocks keep: their inputs and, under selective recomputation, the
outputs the selective policy saves (each storage once; parameters excluded). Time: median of `--repeats` steps
after a warm-up, fp32, this machine's threads; ratios against `none` measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.model import recompute
from tools.bench_report import machine_description, write_section

MODES = ("none", "selective", "full")


class KeptBytes:
    """Counts the storages kept for the backward of the forwards run inside it (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.storages = model, {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def _keep(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(recompute.observing_selective_saves(self._keep))
        if self.model.recompute != "none":
            handles = [block.register_forward_pre_hook(lambda _, args: self._keep(args[0]))
                       for block in self.model.layers]
            self.stack.callback(lambda: [handle.remove() for handle in handles])
        self.stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: self._keep(t) or t, lambda t: t))
        return self

    def __exit__(self, *exc):
        self.stack.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step(model, tokens) -> None:
    model(tokens, tokens).float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


def measure(config: str, batch: int, repeats: int) -> list[dict]:
    cfg = load_config(config, [], check_paths=False)
    torch.manual_seed(0)
    model = cfg.model.build()
    model.train()
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    rows = []
    for mode in MODES:
        model.recompute = mode
        with KeptBytes(model) as kept:
            step(model, tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step(model, tokens)
            times.append(time.perf_counter() - start)
        rows.append({"mode": mode, "kept": kept.total, "seconds": statistics.median(times)})
        print(f"{config} {mode}: kept {kept.total / 2**20:.1f} MiB, step {rows[-1]['seconds'] * 1e3:.0f} ms",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/tiny.yaml", "configs/tiny_moe.yaml"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    lines = ["| model | recompute | kept for the backward MiB | vs none | step ms | vs none |",
             "|---|---|---|---|---|---|"]
    for config in args.configs:
        rows = measure(config, args.batch, args.repeats)
        base = rows[0]
        for row in rows:
            lines.append(f"| {Path(config).stem} | {row['mode']} | {row['kept'] / 2**20:.1f} | "
                         f"{row['kept'] / base['kept']:.2f} | {row['seconds'] * 1e3:.0f} | "
                         f"{row['seconds'] / base['seconds']:.2f} |")
    body = (f"`python -m tools.bench_recompute` — each config's own model and sequence length, batch {args.batch}, "
            f"one forward + backward in fp32, median of {args.repeats}; kept = bytes kept for the backward "
            "(saved tensors outside recomputed blocks, the blocks' inputs, and the outputs selective recomputation "
            "saves).\n\n" + "\n".join(lines) + "\n\nSelective recomputation runs no matmul twice: what it adds is "
            "elementwise work (norms, RoPE, SiLU, casts), a larger share of a CPU step than of a GPU one, where "
            "matmuls dominate; full recomputation runs each block's forward again.\n")
    write_section(args.out, "bench_recompute", "Activation recomputation: memory kept and step time",
                  machine_description(), body)


if __name__ == "__main__":
    main()
