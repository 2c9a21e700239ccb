"""Benchmark: self-speculative decoding with a trained model's MTP modules against plain greedy decoding.

    python -m tools.bench_speculative runs/tiny_moe/checkpoints/step_00000300 [--prompts 8] [--tokens 48]

Prompts are the first tokens of validation windows of the checkpoint's data. Each decoder runs with the KV cache
and without it (every forward recomputing the sequence); speedups are against greedy decoding in the same mode.
Every output is checked to equal uncached greedy decoding's before anything is reported.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args(argv)

    import torch

    from data.loader import TokenWindowLoader
    from pretrain.checkpoint import load_checkpoint
    from pretrain.config import load_config
    from pretrain.generate import greedy, self_speculative
    from tools.bench_report import machine_description, write_section

    checkpoint = Path(args.checkpoint)
    cfg = load_config(checkpoint / "config.yaml")  # the run's resolved config, saved with the checkpoint
    if cfg.model.mtp_depth == 0:
        raise SystemExit(f"{checkpoint} has no MTP modules (model.mtp_depth=0)")
    model = cfg.model.build()
    load_checkpoint(checkpoint, model, restore_rng_state=False)
    loader = TokenWindowLoader(cfg.data, split="val", micro_batch_size=args.prompts,
                               global_batch_size=args.prompts, seed=cfg.train.seed)
    prompts = next(loader)["input_ids"][:, : args.prompt_tokens]
    decoders = {(name, cached): fn for name, fn in (("greedy", greedy), ("self-speculative", self_speculative))
                for cached in (False, True)}
    seconds = dict.fromkeys(decoders, 0.0)
    forwards = dict.fromkeys(decoders, 0)
    drafted = accepted = 0
    for prompt in prompts:
        prompt = prompt.unsqueeze(0)
        want = None
        for (name, cached), decode in decoders.items():
            start = time.perf_counter()
            got, stats = decode(model, prompt, args.tokens, use_cache=cached)
            seconds[name, cached] += time.perf_counter() - start
            want = got if want is None else want
            if not torch.equal(got, want):
                raise SystemExit(f"{name} decoding (cache={cached}) differs from uncached greedy decoding: a bug")
            forwards[name, cached] += stats.main_forwards
            if name == "self-speculative" and cached:
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    acceptance = accepted / max(1, drafted)
    rows = []
    for (name, cached) in decoders:
        label = f"{name} (MTP drafts, acceptance {acceptance:.0%})" if name != "greedy" else name
        speedup = seconds["greedy", cached] / seconds[name, cached]
        rows.append(f"| {label} | {'yes' if cached else 'no'} | {forwards[name, cached]} | "
                    f"{seconds[name, cached]:.2f} | {speedup:.2f} |")
    body = "\n".join([
        f"Checkpoint `{checkpoint}` ({cfg.model.mtp_depth} MTP depth(s)), {args.prompts} validation prompts of "
        f"{args.prompt_tokens} tokens, {args.tokens} new tokens each; every output identical to greedy decoding "
        "(checked). Speedup: against greedy decoding with the same cache setting. The KV cache makes greedy "
        f"decoding {seconds['greedy', False] / seconds['greedy', True]:.2f}x faster here.",
        "",
        "| decoder | KV cache | main-model forwards | wall s | speedup |",
        "|---|---|---:|---:|---:|",
        *rows,
    ])
    write_section(Path(args.out), "bench_speculative", "Self-speculative decoding with MTP (issue 7)",
                  machine_description(), body)
    print(body)


if __name__ == "__main__":
    main()
