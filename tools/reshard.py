"""Offline resharding: a checkpoint, or the whole tensors `consolidate --part all` wrote from one, rewritten as the
checkpoint another parallel layout writes (each rank's pieces in its own shard file), on CPUs.

    pretrain convert reshard SOURCE OUT parallel.tp=2 parallel.pp=2 ...

The checkpoint format does not depend on the layout (any layout resumes from any other), so resharding is never
needed for correctness; it lays the pieces out so that each rank of the target layout reads one file instead of
regions of many, and turns a folder of whole tensors back into a checkpoint that resumes training exactly.

It runs as the target layout's processes (gloo, through torchrun when there is more than one): each builds the
model on the meta device, applies the layout's parallel plan, reads only its own pieces of the source (regions of
whole-tensor files, or of the source's shard files) and saves them with the training run's own checkpoint writer,
so the output is what a run at that layout would have written from the same tensors: each rank holds its own
pieces, as it would in training. A one-process target streams instead (one whole tensor in memory at a time).
The output folder appears only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pretrain.checkpoint import (
    MODEL,
    OPTIMIZER,
    RNG,
    CheckpointError,
    CheckpointManager,
    StoredTensor,
    model_templates,
    pieces,
    read_meta,
    read_pieces,
)
from pretrain.config import Config, ConfigError, config_to_yaml
from pretrain.consolidate import CHECKPOINT_RECORD, iter_full_tensors
from tools.hf.safetensors_folder import DTYPES

ADAMW_STATES = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
LAYOUT_SECTIONS = ("parallel.", "train.")  # what a reshard may change (train.: batch sizes the pipeline splits)


def check_overrides(overrides: list[str]) -> None:
    """Only the layout changes: a model override would describe other tensors than the source holds."""
    for item in overrides:
        if not item.startswith(LAYOUT_SECTIONS):
            raise ConfigError(item, "reshard changes the parallel layout only (parallel.* and train.* batch sizes); "
                              "the model is the source's")


class Source:
    """The tensors to reshard: a checkpoint folder, or a folder of whole tensors with its `checkpoint.json`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if (self.path / "meta.json").is_file():
            self.meta = read_meta(self.path)
            self.checkpoint = True
            self.step, self.state, self.layout = self.meta.step, self.meta.state, self.meta.layout
            self.tensors = self.meta.tensors
            return
        self.checkpoint = False
        record_path = self.path / CHECKPOINT_RECORD
        if not record_path.is_file():
            raise CheckpointError(f"{self.path} is neither a checkpoint (no meta.json) nor a folder written by "
                                  f"`pretrain checkpoint consolidate --part all` (no {CHECKPOINT_RECORD})")
        record = json.loads(record_path.read_text())
        self.step, self.state, self.layout = int(record["step"]), record["state"], record.get("layout", {})
        self.files = _whole_tensor_files(self.path)
        self.tensors = {}
        for file in sorted(set(self.files.values())):  # each file's header once
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    if piece.get_dtype() not in DTYPES:
                        raise CheckpointError(f"{file}: '{name}' has an unsupported dtype {piece.get_dtype()}")
                    self.tensors[name] = StoredTensor(tuple(piece.get_shape()), DTYPES[piece.get_dtype()])
        if not any(name.startswith(OPTIMIZER) for name in self.tensors):
            raise CheckpointError(f"{self.path} holds no optimizer states: consolidate the checkpoint with --part all "
                                  "to reshard it back into one that resumes training")

    def whole_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole tensor) in name order, one at a time."""
        if self.checkpoint:
            yield from iter_full_tensors(self.path, "")
            return
        for name in sorted(self.tensors):
            with safe_open(self.files[name], framework="pt") as f:
                yield name, f.get_tensor(name)

    def read(self, templates: dict[str, torch.Tensor], placements: dict) -> dict[str, torch.Tensor]:
        """Fills this rank's templates (collective when the source is a checkpoint: its shard readers agree)."""
        if self.checkpoint:
            return read_pieces(self.meta, templates, placements)
        with ExitStack() as stack:
            opened = {}
            for name, template in templates.items():
                file = self.files[name]
                if file not in opened:
                    opened[file] = stack.enter_context(safe_open(file, framework="pt"))
                whole, offsets = placements.get(name) or (tuple(template.shape), (0,) * template.dim())
                if tuple(whole) != self.tensors[name].shape:
                    raise CheckpointError(f"'{name}' is {self.tensors[name].shape} in {file} but {tuple(whole)} in "
                                          "the model")
                region = tuple(slice(o, o + n) for o, n in zip(offsets, template.shape, strict=True))
                stored = opened[file].get_slice(name)
                template.copy_(stored[region] if region else opened[file].get_tensor(name))
        return templates


def _whole_tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or several listed in an index)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file} (listed in {indexes[0]}) is missing")
        return files
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                out |= dict.fromkeys(f.keys(), file)
        except Exception as exc:  # a truncated or garbled header
            raise CheckpointError(f"{file} cannot be read: {exc}") from None
    if not out:
        raise CheckpointError(f"{folder} holds no safetensors files")
    return out


def staging_root(out: Path) -> Path:
    return out.parent / f".tmp-reshard-{out.name}"


def _templates(source: Source, model: torch.nn.Module, cfg: Config, is_main: bool) -> dict[str, torch.Tensor]:
    """This rank's pieces, as empty tensors of their local shapes, for every source tensor its stages hold; in the
    order the training run's own save passes them (so that the files are byte for byte what it writes)."""
    from pretrain.optim import param_groups

    stored = source.tensors
    model_part = {name: torch.empty(t.shape, dtype=stored[MODEL + name].dtype)
                  for name, t in model_templates(model).items() if MODEL + name in stored}
    names = {id(p): name for name, p in model.named_parameters()}
    optimizer_order = [names[id(p)] for group in param_groups(model, cfg.optim.weight_decay) for p in group["params"]]
    states: dict[str, list[str]] = {}
    for key in stored:
        if key.startswith(OPTIMIZER):
            name, state = key.removeprefix(OPTIMIZER).rsplit("/", 1)
            states.setdefault(name, []).append(state)
    optimizer = {}
    for name in optimizer_order:  # each parameter's states as AdamW creates them: step, exp_avg, exp_avg_sq
        for state in sorted(states.get(name, []), key=lambda s: (ADAMW_STATES.index(s) if s in ADAMW_STATES else 9, s)):
            meta = stored[f"{OPTIMIZER}{name}/{state}"]  # a state is a scalar (step) or shaped like its parameter
            optimizer[f"{name}/{state}"] = torch.empty(model.get_parameter(name).shape if meta.shape else (),
                                                       dtype=meta.dtype)
    rng = {k.removeprefix(RNG): torch.empty(t.shape, dtype=t.dtype) for k, t in stored.items()
           if k.startswith(RNG)} if is_main else {}
    return pieces(model_part, optimizer, rng)


def _build(cfg: Config, grid) -> tuple[torch.nn.Module, Any, set[str]]:
    """The model on the meta device with the layout's plan applied; also every name of the whole model."""
    import dataclasses

    from parallel.plan import parallelize
    from pretrain.trainer import pipeline_options

    if cfg.train.mtp == "drop":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_depth=0))
    with torch.device("meta"):
        model = cfg.model.build()
    whole = set(model_templates(model))
    p = cfg.parallel
    plan = parallelize(model, grid, p.sequence_parallel, p.grad_bucket_mb, pipeline_options(cfg))
    return model, plan, whole


@contextmanager
def _cleanup_on_failure(root: Path, is_main: bool) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if is_main:
            shutil.rmtree(root, ignore_errors=True)
        raise


def reshard_rank(source_path: Path, out: Path, cfg: Config, grid) -> Path | None:
    """One rank of the target layout (all of them call it): reads its pieces of the source and writes them.
    Rank 0 moves the finished checkpoint to `out` and returns it."""
    from pretrain.lora_checkpoint import LORA_BASE
    from pretrain.trainer import checkpoint_layout

    source = Source(source_path)
    if LORA_BASE in source.state:
        raise CheckpointError(f"{source.path} holds LoRA adapters only: merge them first "
                              f"(`pretrain checkpoint merge {source.path} OUT`) and reshard OUT")
    is_main = grid.rank == 0
    root = staging_root(out)
    with _cleanup_on_failure(root, is_main):
        model, plan, whole_names = _build(cfg, grid)
        unexpected = sorted(k.removeprefix(MODEL) for k in source.tensors
                            if k.startswith(MODEL) and k.removeprefix(MODEL) not in whole_names)
        if unexpected:
            raise CheckpointError(f"{source.path} does not fit the model of its config: unexpected {unexpected}")
        layout = checkpoint_layout(cfg, "reshard") | {"resharded_from": str(source.path.resolve())}
        manager = CheckpointManager(root, keep_last=1)
        if grid.shape.world_size == 1:  # whole tensors, written one at a time as they are read
            entries = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(source.tensors.items())]
            written = manager.save_streamed(source.step, entries, source.whole_tensors(), source.state,
                                            config_to_yaml(cfg), layout)
        else:  # this rank's pieces, all at once, as the training run's own (collective) save takes them
            templates = _templates(source, model, cfg, is_main)
            placements = {key: plan.placement(key.split("/", 1)[1], t.shape) for key, t in templates.items()
                          if key.startswith((MODEL, OPTIMIZER))}
            loaded = source.read(templates, placements)
            written = manager.save(source.step, loaded, source.state, config_to_yaml(cfg), placements, layout).wait()
        if not is_main:
            return None
        os.replace(written, out)
        shutil.rmtree(root, ignore_errors=True)
        return out
