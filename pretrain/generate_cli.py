"""`pretrain generate CHECKPOINT --prompt TEXT`: text from a trained checkpoint, in one process.

    sampling (default)   temperature, top-k, top-p; prompts decoded --batch-size at a time (pretrain/decoding.py),
                         prompt i seeded --seed + i, so its text does not depend on the batch size
    --greedy             the most likely token each step (batched too)
    --beams B            beam search, one prompt at a time
    --speculative        greedy with the checkpoint's MTP modules drafting (pretrain/generate.py), one prompt at a time

Generation stops at <|eos|> (with --chat: at <|end_of_turn|> or <|eos|>), at a --stop text, or after
--max-new-tokens. The model and its precision come as for `pretrain eval` (`load_for_eval`); the tokenizer is the
one the checkpoint was trained with (its meta.json), or --tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.config import ConfigError, load_config

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from pretrain.config import Config
    from pretrain.generate_prompts import Prompt
    from pretrain.model.transformer import Transformer

CHECKPOINT_HINT = "a checkpoint folder such as RUN_DIR/checkpoints/step_00000100"


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="generate text from a checkpoint (sampling, greedy, beam search)")
    parser.add_argument("checkpoint", help=CHECKPOINT_HINT)
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    parser.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, or (.jsonl/.json) one object "
                        "per line with a \"prompt\" string or a \"messages\" list (with --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the chat template and stop at <|end_of_turn|>")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message before each conversation")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 1.0; 0 is greedy)")
    parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set of tokens of probability >= P")
    parser.add_argument("--seed", type=int, help="sampling seed (default: a random one)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--beams", type=int, default=1, help="beam search with B beams (B > 1; no sampling)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: hypotheses score sum_logprob / length**A")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="also stop when the generated tokens end with this text's tokens (removed); repeatable")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (sampling, greedy)")
    parser.add_argument("--speculative", action="store_true",
                        help="greedy, drafted by the checkpoint's MTP modules (self-speculative decoding)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the one the checkpoint was "
                        "trained with)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt: {prompt, completion, tokens (the new token ids)}")
    parser.set_defaults(func=cmd_generate)
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Conflicting or out-of-range options, before anything is loaded."""
    sampling = [name for name, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                         ("--top-p", args.top_p), ("--seed", args.seed)) if value is not None]
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {args.batch_size}")
    if args.beams < 1:
        raise ConfigError("--beams", f"must be at least 1, got {args.beams}")
    if args.beams > 1 and (sampling or args.greedy):
        dropped = ", ".join(sampling) or "--greedy"
        raise ConfigError("--beams", f"beam search chooses tokens deterministically: drop {dropped} (or keep "
                          "--beams 1 to sample)")
    if args.speculative and (sampling or args.beams > 1):
        raise ConfigError("--speculative", "self-speculative decoding is greedy: drop "
                          f"{', '.join(sampling) or '--beams'}")
    if args.greedy and sampling:
        raise ConfigError("--greedy", f"greedy decoding does not sample: drop {', '.join(sampling)}")
    if args.temperature is not None and args.temperature < 0:
        raise ConfigError("--temperature", f"must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k", f"must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")
    if args.system is not None and not args.chat:
        raise ConfigError("--system", "a system message needs --chat")
    if any(not text for text in args.stop):
        raise ConfigError("--stop", "a stop text cannot be empty")


def checkpoint_folder(path: Path) -> Path:
    """`path` if it is a checkpoint folder (it holds meta.json), else an error that says what to pass."""
    from pretrain.checkpoint import META, STEP_PREFIX, CheckpointError

    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: pass {CHECKPOINT_HINT}")
    if not (path / META).is_file():
        found = sorted(p for folder in (path, path / "checkpoints") for p in folder.glob(f"{STEP_PREFIX}*")
                       if (p / META).is_file())
        hint = f" (the newest below it: {found[-1]})" if found else ""
        raise CheckpointError(f"{path} holds no {META}, so it is not a complete checkpoint: pass {CHECKPOINT_HINT}"
                              + hint)
    return path


def tokenizer_file(checkpoint: Path, given: str | None) -> Path:
    """--tokenizer (checked against the checkpoint's), else the tokenizer the checkpoint was trained with."""
    from data.tokenizer import tokenizer_sha256
    from pretrain.checkpoint import read_meta

    trained = read_meta(checkpoint).state.get("tokenizer") or {}
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise ConfigError("--tokenizer", f"{path} is not a file")
        if trained.get("sha256") and tokenizer_sha256(path) != trained["sha256"]:
            raise ConfigError("--tokenizer", f"{path} is not the tokenizer {checkpoint} was trained with "
                              f"({trained.get('path')}, sha256 {trained['sha256'][:12]}…)")
        return path
    if trained.get("path") and Path(trained["path"]).is_file():
        return Path(trained["path"])
    raise ConfigError("--tokenizer", f"{checkpoint} was trained with the tokenizer {trained.get('path', '(unknown)')}, "
                      "which is not on this machine: pass --tokenizer PATH/tokenizer.json")


def load_model(checkpoint: Path, device_name: str | None
               ) -> tuple[Config, Transformer, Callable[[], AbstractContextManager]]:
    """The checkpoint's model on the device (the `pretrain eval` loading path), and its autocast context."""
    import contextlib

    import torch

    from pretrain.evaluate import load_for_eval
    from pretrain.precision import choose_precision

    loaded = load_for_eval(checkpoint)
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = loaded.model.to(device)
    if choose_precision("auto", device).precision == "bf16":
        return loaded.cfg, model, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return loaded.cfg, model, contextlib.nullcontext


def stop_tokens(tokenizer: Tokenizer, chat: bool, stop_texts: list[str]) -> tuple[set[int], list[list[int]]]:
    """(stop ids, stop sequences): <|eos|> (and with --chat <|end_of_turn|>), and the --stop texts' tokens."""
    from data.chat import END_OF_TURN
    from data.tokenizer import EOS

    ids = {tokenizer.token_to_id(EOS)} | ({tokenizer.token_to_id(END_OF_TURN)} if chat else set())
    return ids, [tokenizer.encode(text, add_special_tokens=False).ids for text in stop_texts]


def completions(model: Transformer, prompts: list[Prompt], args: argparse.Namespace, stop_ids: set[int],
                stop_sequences: list[list[int]], pad_id: int, counts: dict[str, int]
                ) -> Iterator[tuple[Prompt, list[int]]]:
    """(prompt, new tokens) for every prompt, in order, a batch (or, for beams and speculative, a prompt) at a time;
    `counts` gathers the MTP drafts made and accepted."""
    import dataclasses

    import torch

    from pretrain.decoding import SamplingOptions, beam_search, cut_at_stops, generate_batch
    from pretrain.generate import self_speculative

    if args.beams > 1 or args.speculative:
        device = next(model.parameters()).device
        for prompt in prompts:
            if args.beams > 1:
                tokens = beam_search(model, prompt.ids, args.max_new_tokens, args.beams, args.length_penalty, stop_ids)
            else:
                out, stats = self_speculative(model, torch.tensor([prompt.ids], device=device), args.max_new_tokens)
                tokens = out[0, len(prompt.ids):].tolist()
                counts["drafted"] += stats.drafted
                counts["accepted"] += stats.accepted
            yield prompt, cut_at_stops(tokens, stop_ids, stop_sequences)
        return
    options = SamplingOptions(temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                              top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    if options.seed is None:
        options = dataclasses.replace(options, seed=torch.Generator().seed() % 2**62)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        seeded = dataclasses.replace(options, seed=options.seed + start)  # prompt i: seed + i, whatever the batches
        new = generate_batch(model, [p.ids for p in batch], args.max_new_tokens, seeded, stop_ids, stop_sequences,
                             pad_id)
        yield from zip(batch, new, strict=True)


def cut_at_stop_texts(tokenizer: Tokenizer, tokens: list[int], stop_texts: list[str]) -> tuple[str, list[int]]:
    """(text, tokens) before the first --stop text. The tokens matched during generation only where the model wrote
    the text as its own tokenization; here the text is cut wherever it appears, and the tokens before the one it
    starts in are kept."""
    text = tokenizer.decode(tokens)
    ends = [text.find(stop) for stop in stop_texts if stop in text]
    if not ends:
        return text, tokens
    kept = next(n for n in range(len(tokens) + 1) if any(stop in tokenizer.decode(tokens[:n]) for stop in stop_texts))
    return text[: min(ends)], tokens[: kept - 1]


def mode_of(args: argparse.Namespace) -> str:
    if args.beams > 1:
        return f"beam search, {args.beams} beams"
    if args.speculative:
        return "self-speculative greedy"
    if args.greedy or args.temperature == 0:
        return "greedy"
    return "sampling"


def cmd_generate(args: argparse.Namespace) -> int:
    check_options(args)
    import torch

    from data.tokenizer import PAD, load_tokenizer
    from pretrain.generate_prompts import encode_prompts, read_prompt_records

    checkpoint = checkpoint_folder(Path(args.checkpoint))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda was asked for, but torch sees no GPU here")
    tokenizer = load_tokenizer(tokenizer_file(checkpoint, args.tokenizer))
    prompts = encode_prompts(read_prompt_records(args.prompt, args.prompts_file), tokenizer, args.chat, args.system)
    if args.speculative and not load_config(checkpoint / "config.yaml", check_paths=False).model.mtp_depth:
        raise ConfigError("--speculative", f"{checkpoint} has no MTP modules to draft with (model.mtp_depth = 0): "
                          "drop --speculative")
    cfg, model, autocast = load_model(checkpoint, args.device)
    longest = max(len(p.ids) for p in prompts) + args.max_new_tokens
    supported = cfg.model.rope.max_supported_seq_len(cfg.model.max_seq_len)
    if longest > supported:
        print(f"warning: prompts and new tokens reach {longest} tokens, beyond the {supported} the model was trained "
              "for", file=sys.stderr)
    stop_ids, stop_sequences = stop_tokens(tokenizer, args.chat, args.stop)
    counts = {"tokens": 0, "drafted": 0, "accepted": 0}
    started = time.perf_counter()
    with autocast():
        for prompt, tokens in completions(model, prompts, args, stop_ids, stop_sequences, tokenizer.token_to_id(PAD),
                                          counts):
            counts["tokens"] += len(tokens)
            completion, tokens = cut_at_stop_texts(tokenizer, tokens, args.stop)
            if args.json:
                print(json.dumps({"prompt": prompt.given, "completion": completion, "tokens": tokens}), flush=True)
            else:
                print(f"### prompt\n{prompt.shown()}\n### completion\n{completion}\n", flush=True)
    took = time.perf_counter() - started
    accepted = (f", {counts['accepted'] / counts['drafted']:.0%} of {counts['drafted']} drafts accepted"
                if counts["drafted"] else "")
    print(f"{len(prompts)} prompt(s), {counts['tokens']} new tokens in {took:.2f} s: "
          f"{counts['tokens'] / max(took, 1e-9):,.1f} tokens/s ({mode_of(args)}{accepted})", file=sys.stderr,
          flush=True)
    return 0
