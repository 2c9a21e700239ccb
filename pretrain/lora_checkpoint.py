"""Checkpoints of LoRA runs: they hold the adapters (and anything else that trains, e.g. MoE routing biases) with
their optimizer states, never the frozen base weights, and name the base checkpoint in their state
(`lora_base`: its path and step). Loading one for inference reads the base, adds the adapters and merges them
into the weights; `pretrain checkpoint merge` writes that merged model as an ordinary checkpoint, which any phase
can start from (`--init-from`) and the conversion tools read.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import (
    MODEL,
    CheckpointError,
    CheckpointManager,
    CheckpointMeta,
    load_checkpoint,
    model_tensors,
    part,
    pieces,
    read_meta,
    read_pieces,
)

LORA_BASE = "lora_base"


def is_adapter_checkpoint(meta: CheckpointMeta) -> bool:
    return LORA_BASE in meta.state


def base_checkpoint(meta: CheckpointMeta) -> Path:
    """The checkpoint whose weights a LoRA checkpoint's adapters sit on (it must still exist)."""
    base = meta.state.get(LORA_BASE) or {}
    path = Path(base.get("path", ""))
    if not base.get("path") or not (path / "meta.json").is_file():
        raise CheckpointError(f"{meta.path} holds LoRA adapters on the base checkpoint {path or '(unrecorded)'}, "
                              "which is not there: the adapters are useless without it")
    return path


def refuse_adapters_as_source(meta: CheckpointMeta) -> None:
    if is_adapter_checkpoint(meta):
        raise CheckpointError(
            f"{meta.path} holds LoRA adapters only (its base: {meta.state[LORA_BASE].get('path')}): merge them into "
            f"the weights first, `pretrain checkpoint merge {meta.path} OUT`, and start from OUT")


def load_adapted(meta: CheckpointMeta, cfg: Any, model: nn.Module) -> nn.Module:
    """`model` (the plain model of `cfg.model`, one process) with the base's weights and the checkpoint's adapters
    merged into them: a plain model again."""
    from pretrain.model.lora import apply_lora, merge_lora

    load_checkpoint(base_checkpoint(meta), model, restore_rng_state=False)
    apply_lora(model, cfg.lora)
    stored = {k: shape for k, shape in meta.tensor_shapes().items() if k.startswith(MODEL)}
    templates = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored.items()}
    trained = part(read_pieces(meta, pieces(part(templates, MODEL), {})), MODEL)
    names = dict(model.state_dict())
    unexpected = sorted(set(trained) - set(names))
    missing = sorted(k for k in names if k.endswith((".lora_a", ".lora_b")) and k not in trained)
    if unexpected or missing:
        raise CheckpointError(f"{meta.path} does not fit its config's LoRA model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    model.load_state_dict(trained, strict=False)
    return merge_lora(model)


def merge_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write the merged model of a LoRA checkpoint as an ordinary (one-piece) checkpoint folder `out`."""
    from pretrain.config import config_to_yaml, load_config

    meta = read_meta(checkpoint)
    if not is_adapter_checkpoint(meta):
        raise CheckpointError(f"{meta.path} is not a LoRA checkpoint (it holds whole weights already)")
    if out.exists():
        raise CheckpointError(f"{out} exists: choose a new folder for the merged checkpoint")
    cfg = load_config(meta.path / "config.yaml", check_paths=False)
    model = load_adapted(meta, cfg, cfg.model.build())
    plain = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
    state = {key: meta.state[key] for key in ("tokenizer", "data", "last_val", "initialized_from")
             if key in meta.state} | {"merged_from": {"path": str(meta.path.resolve()), "step": meta.step}}
    staging = out.parent / f".merge-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    written = CheckpointManager(staging, keep_last=1).save(
        meta.step, pieces(model_tensors(model), {}), state, config_to_yaml(plain), layout={"world_size": 1}).wait()
    os.replace(written, out)
    shutil.rmtree(staging)
    return out
