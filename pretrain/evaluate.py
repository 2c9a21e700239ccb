"""`pretrain eval CHECKPOINT --tasks long_ppl,passkey`: long-context evaluation of a checkpoint, in one process.

long_ppl  validation loss per position bucket of windows of `seq_len` tokens: a model that does not extrapolate
          gets worse in the buckets past the length it was trained at.
passkey   a random 5-digit number hidden at several depths of filler text of several lengths (data/passkey.py),
          greedy-decoded after the question; exact match of the digits. Accuracy per length x depth.
sft       held-out chat questions (the validation split of a `--format sft` folder): the last reply generated
          greedily, exact match and word F1 against the reference (pretrain/eval_sft.py).

The model comes from the checkpoint's own config (overrides may change what needs no new tensors, e.g. the RoPE
scaling, to evaluate a scaling without training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data.loader import TokenWindowLoader
from data.passkey import KEY_DIGITS, build_prompt, random_key
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import CheckpointError, load_checkpoint, read_meta
from pretrain.config import Config, load_config
from pretrain.generate import greedy
from pretrain.lora_checkpoint import is_adapter_checkpoint, load_adapted
from pretrain.model.transformer import Transformer
from pretrain.precision import choose_precision

TASKS = ("long_ppl", "passkey", "sft")
ANSWER_TOKENS = 8  # room left after a passkey prompt for the generated digits


@dataclass
class EvalSettings:
    tasks: tuple[str, ...] = TASKS
    seq_len: int = 0  # long_ppl window length; 0: the checkpoint's data.seq_len
    data_dir: str = ""  # long_ppl data (its val split); empty: the checkpoint's data.dir
    windows: int = 16
    buckets: int = 4
    lengths: list[int] = field(default_factory=list)  # passkey prompt lengths; empty: seq_len x 1/2, 1, 2, 4
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 4
    seed: int = 0
    questions: int = 100  # sft: held-out conversations answered


@dataclass
class LoadedModel:
    cfg: Config
    model: Transformer
    step: int
    autocast: Any


def load_for_eval(checkpoint: Path, overrides: list[str] | None = None) -> LoadedModel:
    meta = read_meta(checkpoint)
    config = meta.path / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{config} is missing: the checkpoint does not say which model it holds")
    cfg = load_config(config, overrides, check_paths=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision("auto", device).precision
    torch.manual_seed(cfg.train.seed)
    model = cfg.model.build()  # whole, in one process (its initial values are overwritten)
    if is_adapter_checkpoint(meta):  # LoRA: the base's weights with the adapters merged in
        model = load_adapted(meta, cfg, model)
    else:
        load_checkpoint(meta.path, model, restore_rng_state=False)
    model = model.to(device).eval()

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return LoadedModel(cfg, model, meta.step, autocast)


@torch.no_grad()
def long_ppl(loaded: LoadedModel, settings: EvalSettings) -> dict[str, Any]:
    """Mean next-token loss of the first `windows` validation windows, per position bucket."""
    cfg = loaded.cfg
    seq_len = settings.seq_len or cfg.data.seq_len
    data = dataclasses.replace(cfg.data, dir=settings.data_dir or cfg.data.dir, blend=[], seq_len=seq_len,
                               num_workers=0, document_masking=False)
    loader = TokenWindowLoader(data, split="val", micro_batch_size=1, global_batch_size=1, seed=cfg.train.seed)
    windows = min(settings.windows, loader.windows_per_epoch)
    if windows == 0:
        raise ValueError(f"{data.dir}'s validation split has no window of {seq_len} tokens: prepare it with longer "
                         "documents or a larger --val-fraction")
    device = next(loaded.model.parameters()).device
    per_position = torch.zeros(seq_len, dtype=torch.float64)
    for _ in range(windows):
        batch = next(loader)
        with loaded.autocast():
            logits = loaded.model(batch["input_ids"].to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten(), reduction="none")
        per_position += loss.double().cpu()
    per_position /= windows
    edges = [round(i * seq_len / settings.buckets) for i in range(settings.buckets + 1)]
    buckets = [{"start": a, "end": b, "loss": float(per_position[a:b].mean())}
               for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return {"seq_len": seq_len, "windows": windows, "data_dir": data.dir, "loss": float(per_position.mean()),
            "buckets": buckets}


@torch.no_grad()
def passkey(loaded: LoadedModel, tokenizer_path: Path, settings: EvalSettings) -> dict[str, Any]:
    """Exact-match retrieval accuracy per (length, depth), `trials` random keys each; also the key tokens' mean
    teacher-forced log-probability and how often the first key token is right (greedy)."""
    tokenizer = load_tokenizer(tokenizer_path)
    eos = tokenizer.token_to_id("<|eos|>")
    base = settings.seq_len or loaded.cfg.data.seq_len
    lengths = settings.lengths or [base // 2, base, base * 2, base * 4]
    rng = random.Random(settings.seed)
    device = next(loaded.model.parameters()).device
    cells = []
    for length in lengths:
        for depth in settings.depths:
            correct, logprob, first_token = 0, 0.0, 0
            for _ in range(settings.trials):
                key = random_key(rng)
                # a document follows an EOS in training: the prompt does too, and fills `length` with the answer
                prompt = build_prompt(lambda s: tokenizer.encode(s).ids, key, length - ANSWER_TOKENS - 1, depth)
                ids = torch.tensor([[eos, *prompt.token_ids]], device=device)
                with loaded.autocast():
                    out, _ = greedy(loaded.model, ids, ANSWER_TOKENS)
                correct += answer_matches(tokenizer.decode(out[0, ids.shape[1]:].tolist()), key)
                key_ids = tokenizer.encode(f" {key}").ids
                logprob += float(teacher_forced_key_logprobs(loaded, ids, key_ids).mean())
                first_token += int(out[0, ids.shape[1]].item() == key_ids[0])
            n = settings.trials
            cells.append({"length": length, "depth": depth, "accuracy": correct / n, "key_logprob": logprob / n,
                          "first_token_accuracy": first_token / n, "trials": n})
    return {"lengths": lengths, "depths": list(settings.depths), "cells": cells, "key_digits": KEY_DIGITS,
            "accuracy": sum(c["accuracy"] for c in cells) / len(cells),
            "key_logprob": sum(c["key_logprob"] for c in cells) / len(cells),
            "first_token_accuracy": sum(c["first_token_accuracy"] for c in cells) / len(cells)}


@torch.no_grad()
def teacher_forced_key_logprobs(loaded: LoadedModel, prompt_ids: torch.Tensor, key_ids: list[int]) -> torch.Tensor:
    """Log-probability of each of the key's tokens given the prompt and the key's earlier tokens: a graded view of
    retrieval (exact match is all or nothing; e.g. a model that finds the first digit but cannot copy on)."""
    key = torch.tensor([key_ids], device=prompt_ids.device)
    ids = torch.cat([prompt_ids, key], dim=1)
    with loaded.autocast():
        logits = loaded.model(ids[:, :-1])
    logprobs = F.log_softmax(logits[0, -len(key_ids):].float(), dim=-1)
    return logprobs.gather(1, key[0].unsqueeze(1)).squeeze(1).cpu()


def answer_matches(answer: str, key: str) -> bool:
    """The generated text starts with exactly the key's digits (leading spaces aside)."""
    found = re.match(r"\s*(\d+)", answer)
    return found is not None and found.group(1) == key


def evaluate_checkpoint(checkpoint: Path, settings: EvalSettings, overrides: list[str] | None = None
                        ) -> dict[str, Any]:
    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    loaded = load_for_eval(checkpoint, overrides)
    rope = loaded.cfg.model.rope
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "step": loaded.step, "rope_scaling": rope.scaling,
                              "rope_factor": rope.factor, "trained_seq_len": loaded.cfg.data.seq_len}
    if "long_ppl" in settings.tasks:
        report["long_ppl"] = long_ppl(loaded, settings)
    if "passkey" in settings.tasks:
        data_dir = Path(settings.data_dir or loaded.cfg.data.dataset_dirs()[0][0])
        report["passkey"] = passkey(loaded, data_dir / "tokenizer.json", settings)
    if "sft" in settings.tasks:
        from pretrain.eval_sft import sft_answers

        report["sft"] = sft_answers(loaded, Path(settings.data_dir or loaded.cfg.data.dir), settings.questions)
    return report


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as flat metric names (for MLflow): eval/long_ppl/loss and per position bucket,
    eval/passkey/accuracy and per length and depth, eval/passkey/key_logprob and first_token_accuracy."""
    metrics: dict[str, float] = {}
    if "long_ppl" in report:
        r = report["long_ppl"]
        metrics[f"eval/long_ppl/loss_{r['seq_len']}"] = r["loss"]
        for b in r["buckets"]:
            metrics[f"eval/long_ppl/loss_{r['seq_len']}_pos_{b['start']}_{b['end']}"] = b["loss"]
    if "passkey" in report:
        r = report["passkey"]
        metrics["eval/passkey/accuracy"] = r["accuracy"]
        for name in ("key_logprob", "first_token_accuracy"):
            if name in r:
                metrics[f"eval/passkey/{name}"] = r[name]
        for c in r["cells"]:
            metrics[f"eval/passkey/len_{c['length']}_depth_{c['depth']:.2f}"] = c["accuracy"]
    if "sft" in report:
        metrics["eval/sft/exact_match"] = report["sft"]["exact_match"]
        metrics["eval/sft/f1"] = report["sft"]["f1"]
    return metrics


def depth_table(passkey_report: dict[str, Any], field: str, cell_format: str) -> list[str]:
    """One passkey measure as a length x depth table."""
    lines = ["  length \\ depth " + "".join(f"{d:>7.2f}" for d in passkey_report["depths"])]
    for length in passkey_report["lengths"]:
        row = [c[field] for c in passkey_report["cells"] if c["length"] == length]
        lines.append(f"  {length:>14} " + "".join(cell_format.format(v) for v in row))
    return lines


def format_report(report: dict[str, Any]) -> list[str]:
    lines = [f"{report['checkpoint']} (step {report['step']}, trained at {report['trained_seq_len']} tokens, RoPE "
             f"scaling {report['rope_scaling']}" + (f" x{report['rope_factor']:g}" if report["rope_scaling"] != "none"
                                                    else "") + ")"]
    if "long_ppl" in report:
        r = report["long_ppl"]
        lines.append(f"long_ppl: validation loss by position, {r['windows']} windows of {r['seq_len']} tokens "
                     f"({r['data_dir']}): overall {r['loss']:.3f} (ppl {math.exp(min(r['loss'], 50)):.1f})")
        lines.append("  " + "  ".join(f"{b['start']:>5}-{b['end']:<5}" for b in r["buckets"]))
        lines.append("  " + "  ".join(f"{b['loss']:>11.3f}" for b in r["buckets"]))
    if "passkey" in report:
        r = report["passkey"]
        lines.append(f"passkey: exact-match accuracy, {r['cells'][0]['trials']} keys per cell, overall "
                     f"{r['accuracy']:.0%}")
        lines += depth_table(r, "accuracy", "{:>7.0%}")
        if "key_logprob" in r:
            lines.append(f"passkey: mean log-probability per key token (teacher-forced; 0 = certain), overall "
                         f"{r['key_logprob']:.2f}")
            lines += depth_table(r, "key_logprob", "{:>7.2f}")
            lines.append(f"passkey: first key token right (the key found, whether or not copied on), overall "
                         f"{r['first_token_accuracy']:.0%}")
            lines += depth_table(r, "first_token_accuracy", "{:>7.0%}")
    if "sft" in report:
        r = report["sft"]
        lines.append(f"sft: {r['questions']} held-out questions ({r['data_dir']}): exact match {r['exact_match']:.1%}, "
                     f"word F1 {r['f1']:.3f}")
        for e in r["examples"]:
            lines.append(f"  Q: {e['question']}\n     A: {e['answer']}\n  want: {e['reference']}")
    return lines
