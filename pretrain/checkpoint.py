"""Atomic, sharded, layout-free, pickle-free checkpoints.

Layout of one checkpoint (`RUN_DIR/checkpoints/step_00000100/`):

    shards/shard-RRRRR-model-00001-of-00001.safetensors
                           each writing rank's pieces of the tensors below, with their offsets in the full
                           tensors (torch.distributed.checkpoint's sharded safetensors; see pretrain/sharded_io.py)
    config.yaml            the resolved config of the run
    meta.json              step, trainer/loader state, tokenizer reference, the layout that wrote it, and the
                           size and sha256 of every shard file; written last

Tensors by name, always the full (unsharded) model's names and shapes, so the format does not depend on the
parallel layout that wrote it:

    model/<name>             parameters and persistent buffers (a tied weight once, under its first name)
    optimizer/<name>/<key>   AdamW state (step, exp_avg, exp_avg_sq)
    rng/<generator>          the main rank's torch RNG states

Every rank writes its own pieces in parallel (replicas once) into a hidden `.tmp-step_*` folder; once all are
written and synced, rank 0 writes meta.json and renames the folder into place, so a crash mid-save leaves only a
`.tmp-*` folder that loaders ignore and the next save removes. A reading rank checks the sha256 of the shard files
it reads from, and only those. `pretrain checkpoint consolidate` writes whole tensors from it offline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.fault_injection import kill_point
from pretrain.sharded_io import (
    Fragment,
    Placement,
    ReadRecord,
    ShardReadError,
    ShardWriteError,
    StoredFile,
    StoredTensor,
    load_pieces,
    save_pieces,
    sha256_file,
)

FORMAT_VERSION = 2
STEP_PREFIX = "step_"
META = "meta.json"
SHARDS = "shards"
MODEL, OPTIMIZER, RNG = "model/", "optimizer/", "rng/"
INVALID = "invalid"  # where unusable checkpoints are moved
ONE_PROCESS_SHARD = "shard-00001-model-00001-of-00001"  # the shard file of a one-process save (DCP's name)
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _persistent_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; a tied weight appears once, under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    persistent = set(model.state_dict().keys())
    return {k: v for k, v in out.items() if k in persistent}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, on the CPU (tied weights once)."""
    return {k: v.detach().contiguous().cpu() for k, v in _persistent_tensors(model).items()}


def model_templates(model: nn.Module) -> dict[str, torch.Tensor]:
    """Empty CPU tensors shaped like `model_tensors(model)`, for a load to fill."""
    return {k: torch.empty(v.shape, dtype=v.dtype) for k, v in _persistent_tensors(model).items()}


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


def pieces(model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
           rng: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One rank's tensors under their checkpoint names (see the module docstring)."""
    out = {MODEL + k: v for k, v in model.items()} | {OPTIMIZER + k: v for k, v in optimizer.items()}
    return out | {RNG + k: v for k, v in (rng or {}).items()}


@dataclass
class CheckpointMeta:
    path: Path
    step: int
    state: dict[str, Any]
    files: dict[str, StoredFile]  # shard file name -> its size and sha256
    tensors: dict[str, StoredTensor]  # checkpoint name -> full shape and dtype
    layout: dict[str, Any]
    saved_at: float = 0.0  # seconds since the epoch
    read: ReadRecord = field(default_factory=ReadRecord)  # what this process's reads of it learnt (files, headers)

    @property
    def shards(self) -> Path:
        return self.path / SHARDS

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored tensor's full shape and dtype."""
        return {name: (t.shape, t.dtype) for name, t in self.tensors.items()}


def save_failed(final: Path, why: object) -> CheckpointError:
    """The error of a save that did not complete: its partial folder removed (by rank 0, once every rank has
    stopped writing), the checkpoint before it untouched and named."""
    import torch.distributed as dist

    tmp = final.parent / f".tmp-{final.name}"
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = [p.name for p in CheckpointManager(final.parent).checkpoints() if p != final]
    full = any(f"[Errno {code}]" in str(why) for code in (27, 28))  # EFBIG, ENOSPC
    hint = " (is the disk full or a file-size limit reached?)" if full else ""
    before = f"the newest checkpoint is still {kept[-1]}" if kept else "there is no earlier checkpoint"
    return CheckpointError(f"saving {final} failed: {why}{hint}; its partial files were removed and {before}")


class PendingSave:
    """A checkpoint being written in the background; `wait()` returns its path once it is in place."""

    def __init__(self, path: Path, future=None):
        self.path, self.future = path, future

    def wait(self) -> Path:
        if self.future is not None:
            try:
                self.future.result()
            except BaseException as exc:  # DCP raises a BaseException (CheckpointException) for rank failures
                raise save_failed(self.path, exc) from None
            self.future = None
        return self.path


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        config_yaml: str,
        placements: dict[str, Placement | Fragment] | None = None,
        layout: dict[str, Any] | None = None,
        group=None,
        asynchronous: bool = False,
    ) -> PendingSave:
        """Collective when distributed: every rank passes its own pieces (`pieces(...)`) and their placements in
        the full tensors (none: whole tensors). `state`, `config_yaml` and `layout` are taken from rank 0.
        `asynchronous`: returns once the pieces are copied; the files are written in the background."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"  # every rank's DCP writer creates it before planning

        def start() -> None:  # rank 0, before any rank writes: no leftovers of a crashed save
            self._remove_stale_tmp()
            (tmp / SHARDS).mkdir(parents=True)

        def commit(files: list[StoredFile], tensors: dict[str, StoredTensor]) -> None:
            """Rank 0, once every rank's files are written and synced."""
            self._commit(step, files, tensors, state, config_yaml, layout)

        try:
            future = save_pieces(tmp / SHARDS, tensors, placements or {}, start, commit, group, asynchronous,
                                 on_written=lambda: kill_point(step, "save"))
        except ShardWriteError as exc:
            raise save_failed(final, exc) from None
        return PendingSave(final, future)

    def save_streamed(self, step: int, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[tuple[str, torch.Tensor]], state: dict[str, Any], config_yaml: str,
                      layout: dict[str, Any] | None = None) -> Path:
        """One process, whole tensors: the checkpoint a one-process `save` writes, but written tensor by tensor as
        `tensors` yields them (name, tensor) in the order of `entries` (name, dtype, full shape), so that only one is
        in memory at a time (offline conversions of models larger than memory)."""
        from pretrain.consolidate import write_safetensors

        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        self._remove_stale_tmp()
        (tmp / SHARDS).mkdir(parents=True)
        try:
            sharding = {name: {"saved_offsets": [0] * len(shape)} for name, _, shape in entries}
            metadata = {"DCP_SHARDING_INFO": json.dumps(sharding), "DCP_VERSION": "1.0", "format": "pt"}
            written = write_safetensors(tmp / SHARDS, ONE_PROCESS_SHARD, entries, tensors, metadata=metadata)
            for file in written:
                _fsync_file(file)
            files = [StoredFile(f.name, sha256_file(f), f.stat().st_size) for f in written]
            stored = {name: StoredTensor(tuple(shape), dtype) for name, dtype, shape in entries}
            self._commit(step, files, stored, state, config_yaml, layout)
        except OSError as exc:
            raise save_failed(final, exc) from None
        except BaseException:  # e.g. a tensor the caller could not produce: its own error, nothing left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _commit(self, step: int, files: list[StoredFile], tensors: dict[str, StoredTensor], state: dict[str, Any],
                config_yaml: str, layout: dict[str, Any] | None) -> None:
        """Once every shard file is written and synced: config.yaml and meta.json (last), then the folder into place
        and the old checkpoints pruned."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        (tmp / "config.yaml").write_text(config_yaml)
        _fsync_file(tmp / "config.yaml")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            "layout": layout or {},
            "files": {f.name: {"sha256": f.sha256, "bytes": f.bytes} for f in files},
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for name, t in sorted(tensors.items())},
            "state": state,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _fsync_file(tmp / META)
        _pause_for_tests("before_rename")
        _fsync_dir(tmp / SHARDS)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _pause_for_tests("before_prune")
        self._prune(keep=final)

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
        return sorted(dirs, key=lambda p: p.name)

    def survey(self) -> tuple[list[Path], dict[Path, str]]:
        """(checkpoints whose meta.json and shard files are all there, oldest written first; the others with what is
        wrong with each). Contents are checked on reading. Written-time order, not name order: after a resume from
        an older checkpoint, steps of the abandoned continuation were written before the new ones."""
        complete, broken = [], {}
        for path in self.checkpoints():
            try:
                meta = read_meta(path)
                complete.append((meta.saved_at, meta.step, path))
            except CheckpointError as exc:
                broken[path] = str(exc)
        return [path for _, _, path in sorted(complete)], broken

    def complete(self) -> list[Path]:
        complete, broken = self.survey()
        for problem in broken.values():
            log.warning("skipping checkpoint: %s", problem)
        return complete

    def latest_valid(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def move_aside(self, path: Path, reason: str) -> Path:
        """An unusable checkpoint goes to `invalid/` (never deleted: it may be worth a look), with a warning."""
        target = self.root / INVALID / path.name
        n = 1
        while target.exists():
            target, n = self.root / INVALID / f"{path.name}.{n}", n + 1
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.warning("moved unusable checkpoint %s to %s: %s", path, target, reason)
        return target

    def _prune(self, keep: Path) -> None:
        """Keep the `keep_last` most recently written valid checkpoints, `keep` (the one just written) always;
        incomplete ones are moved aside, not deleted."""
        complete, broken = self.survey()
        for path, reason in broken.items():
            self.move_aside(path, reason)
        newest_first = [keep] + [p for p in reversed(complete) if p != keep]
        for old in newest_first[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _pause_for_tests(point: str) -> None:
    """Lets the atomicity test kill a save midway; inert unless the variable names this point."""
    if os.environ.get("PRETRAIN_TEST_PAUSE_IN_SAVE") == point:
        time.sleep(float(os.environ.get("PRETRAIN_TEST_PAUSE_SECONDS", "30")))


def _checkpoints_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.glob(f"{STEP_PREFIX}*") if (p / META).is_file())


def _not_a_checkpoint(path: Path) -> str:
    """Why `path`, a folder without meta.json, is not a checkpoint, naming the checkpoints near it."""
    if not path.exists():
        near = _checkpoints_in(path.parent)
        if near:
            return (f"checkpoint {path} does not exist (train.keep_last may have removed it); {path.parent} holds "
                    f"{', '.join(near[-5:])}")
        return f"checkpoint {path} does not exist"
    for folder in (path, path / "checkpoints"):
        inside = _checkpoints_in(folder)
        if inside:
            return (f"{path} is a folder of checkpoints, not a checkpoint: name one of them, e.g. "
                    f"{folder / inside[-1]} (it holds {', '.join(inside[-5:])})")
    return f"{path / META} is missing: the checkpoint {path} is incomplete"


def read_meta(path: Path) -> CheckpointMeta:
    """The checkpoint's meta.json, after checking that every shard file it lists is there with its size (cheap;
    contents are checked by the ranks that read them, or all at once by `verify(path, contents=True)`)."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(_not_a_checkpoint(path))
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {version} is not readable by this version (it reads "
                              f"{FORMAT_VERSION}: sharded checkpoints)")
    try:
        files = {name: StoredFile(name, f["sha256"], int(f["bytes"])) for name, f in meta["files"].items()}
        step, state = int(meta["step"]), meta["state"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{meta_path} is malformed: its {exc} entry is missing or wrong") from None
    for name, stored in files.items():
        f = path / SHARDS / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != stored.bytes:
            raise CheckpointError(f"{f} is {f.stat().st_size} bytes, {meta_path} says {stored.bytes}: truncated?")
    try:
        tensors = {name: StoredTensor(tuple(t["shape"]), getattr(torch, t["dtype"]))
                   for name, t in meta["tensors"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{meta_path}: its 'tensors' entry is malformed ({exc})") from exc
    return CheckpointMeta(path, step, state, files, tensors, meta.get("layout", {}), float(meta.get("saved_at", 0)))


def verify(path: Path, contents: bool = True) -> CheckpointMeta:
    """`read_meta`, and with `contents` the sha256 of every shard file (what one rank would never do alone)."""
    meta = read_meta(path)
    if contents:
        for stored in meta.files.values():
            if sha256_file(meta.shards / stored.name) != stored.sha256:
                raise CheckpointError(f"{meta.shards / stored.name} is corrupt: its sha256 does not match "
                                      f"{meta.path / META}")
    return meta


def read_pieces(meta: CheckpointMeta, templates: dict[str, torch.Tensor],
                placements: dict[str, Placement | Fragment] | None = None, group=None) -> dict[str, torch.Tensor]:
    """Collective when distributed: fills this rank's `templates` (checkpoint names -> tensors of this rank's
    shapes, placed in the full tensors by `placements`; none: whole tensors) and returns them."""
    try:
        load_pieces(meta.shards, templates, placements or {}, meta.files, group, meta.read)
    except ShardReadError as exc:
        raise CheckpointError(f"cannot load {meta.path}: {exc}") from None
    return templates


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str,
                       missing_ok: frozenset[str] = frozenset()) -> None:
    """Loads tensors by name; a tied alias missing from the file is fine, and so are the names in `missing_ok`;
    anything else missing is an error."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in missing_ok and not _is_tied_alias(model, k, tensors)]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing}, unexpected {unexpected}")


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng_state: bool = True
) -> LoadedCheckpoint:
    """One process: read a checkpoint (any layout wrote it) into an unsharded model (and optimizer)."""
    meta = read_meta(path)
    stored = meta.tensor_shapes()
    model_state = model_templates(model)
    extra = sorted(k.removeprefix(MODEL) for k in stored if k.startswith(MODEL) and k[len(MODEL):] not in model_state)
    templates = pieces(model_state, {})
    if optimizer is not None:
        templates |= {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored.items()
                      if k.startswith(OPTIMIZER)}
    if restore_rng_state:
        templates |= {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in stored.items() if k.startswith(RNG)}
    missing = sorted(k.removeprefix(MODEL) for k in templates if k not in stored)
    if missing or extra:
        raise CheckpointError(f"{meta.path} does not fit the model: missing {missing}, unexpected {extra}")
    loaded = read_pieces(meta, templates)
    load_model_tensors(model, part(loaded, MODEL), meta.path)
    if optimizer is not None:
        load_optimizer_tensors(model, optimizer, part(loaded, OPTIMIZER))
    if restore_rng_state:
        restore_rng(part(loaded, RNG))
    return LoadedCheckpoint(path=meta.path, step=meta.step, state=meta.state)


def _is_tied_alias(model: nn.Module, key: str, weights: dict[str, torch.Tensor]) -> bool:
    """A state-dict key absent from the file because it shares storage with one that is present."""
    sd = model.state_dict(keep_vars=True)
    target = sd.get(key)
    return target is not None and any(sd[k] is target for k in weights if k in sd)
