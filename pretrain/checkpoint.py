"""Atomic, checksummed, pickle-free checkpoints.

Layout of one checkpoint (`RUN_DIR/checkpoints/step_00000100/`):

    model.safetensors      weights by parameter name (tied weights stored once)
    optimizer.safetensors  AdamW state by "<param name>/<state key>" (exp_avg, exp_avg_sq, step)
    rng.safetensors        torch RNG states
    config.yaml            the resolved config of the run
    meta.json              step, trainer/loader state, tokenizer reference, sha256 of every file above

A save writes into a hidden temporary folder, fsyncs every file, then renames the folder into place, so a
crash mid-save leaves only a `.tmp-*` folder that loaders ignore and the next save removes. Names are
unsharded parameter names, so the format does not depend on the parallel layout that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
META = "meta.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; a tied weight appears once, under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach().contiguous().cpu()
    persistent = set(model.state_dict().keys())
    return {k: v for k, v in out.items() if k in persistent}


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                out[f"{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return out


def load_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, state_key = key.rsplit("/", 1)
        if name not in params:
            raise CheckpointError(f"optimizer state for unknown parameter '{name}'")
        p = params[name]
        optimizer.state[p][state_key] = value.to(p.device)


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, torch.Tensor],
        state: dict[str, Any],
        config_yaml: str,
    ) -> Path:
        """Writes full (layout-free) tensors: see `model_tensors` and `optimizer_tensors`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in optimizer_state.items()}, tmp / "optimizer.safetensors")
        save_file(rng_tensors(), tmp / "rng.safetensors")
        (tmp / "config.yaml").write_text(config_yaml)
        _pause_for_tests("after_tensors")
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            files[f.name] = sha256_file(f)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            "files": files,
            "state": state,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _fsync_file(tmp / META)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
        return sorted(dirs, key=lambda p: p.name)

    def latest_valid(self) -> Path | None:
        for path in reversed(self.checkpoints()):
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _pause_for_tests(point: str) -> None:
    """Lets the atomicity test kill a save midway; inert unless the variable names this point."""
    if os.environ.get("PRETRAIN_TEST_PAUSE_IN_SAVE") == point:
        time.sleep(float(os.environ.get("PRETRAIN_TEST_PAUSE_SECONDS", "30")))


def verify(path: Path) -> dict[str, Any]:
    """Checks that meta.json exists and every file matches its checksum; returns the meta."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: the checkpoint {path} is incomplete")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f} is corrupt: its sha256 does not match {meta_path}")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc


@dataclass
class CheckpointContents:
    path: Path
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def read_checkpoint(path: Path) -> CheckpointContents:
    """Verifies checksums, then reads the full tensors (on CPU)."""
    path = Path(path)
    meta = verify(path)
    return CheckpointContents(
        path=path,
        step=int(meta["step"]),
        state=meta["state"],
        model=_read_tensors(path / "model.safetensors"),
        optimizer=_read_tensors(path / "optimizer.safetensors"),
        rng=_read_tensors(path / "rng.safetensors"),
    )


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Loads tensors by name; a tied alias missing from the file is fine, anything else missing is an error."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not _is_tied_alias(model, k, tensors)]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng_state: bool = True
) -> LoadedCheckpoint:
    """Single-process convenience: read a checkpoint into an unsharded model (and optimizer)."""
    contents = read_checkpoint(path)
    load_model_tensors(model, contents.model, contents.path / "model.safetensors")
    if optimizer is not None:
        load_optimizer_tensors(model, optimizer, contents.optimizer)
    if restore_rng_state:
        restore_rng(contents.rng)
    return LoadedCheckpoint(path=contents.path, step=contents.step, state=contents.state)


def _is_tied_alias(model: nn.Module, key: str, weights: dict[str, torch.Tensor]) -> bool:
    """A state-dict key absent from the file because it shares storage with one that is present."""
    sd = model.state_dict(keep_vars=True)
    target = sd.get(key)
    return target is not None and any(sd[k] is target for k in weights if k in sd)
