"""Whole tensors from a sharded checkpoint, offline: one process, CPU only, one whole tensor in memory at a time.

    pretrain checkpoint consolidate CHECKPOINT OUT_DIR [--part model|optimizer|all] [--dtype keep|fp32|bf16]
                                    [--max-file-size 5GB]

writes `model.safetensors` (or `model-0000K-of-0000N.safetensors` files and `model.safetensors.index.json`, as
Hugging Face lays them out, when the tensors exceed `--max-file-size`) plus the run's `config.yaml` and
`checkpoint.json` (the step, trainer state and layout of the checkpoint; with `--part all`, what
`pretrain convert reshard` needs to write a checkpoint back from the whole tensors). The
conversion tools (tools/convert_hf.py) read whole tensors through `iter_full_tensors` and write them with
`write_safetensors` the same way.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from pretrain.checkpoint import MODEL, OPTIMIZER, CheckpointError, verify

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
PARTS = {"model": MODEL, "optimizer": OPTIMIZER, "all": ""}
CHECKPOINT_RECORD = "checkpoint.json"  # beside the whole tensors: the step, state and layout they came from


def _chunks_by_tensor(shards: Path) -> dict[str, list[tuple[Path, tuple[int, ...]]]]:
    """name -> [(file, offsets)] for every piece of every tensor, from the shard files' headers."""
    out: dict[str, list[tuple[Path, tuple[int, ...]]]] = {}
    for file in sorted(shards.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            sharding = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for name in f.keys():
                offsets = tuple(sharding.get(name, {}).get("saved_offsets", ()))
                out.setdefault(name, []).append((file, offsets))
    return out


def iter_full_tensors(checkpoint: Path, prefix: str = MODEL, check_contents: bool = True,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name without `prefix`, whole tensor) for every stored tensor whose name starts with `prefix`, in name
    order, assembled from its pieces one tensor at a time."""
    meta = verify(checkpoint, contents=check_contents)
    shapes = meta.tensor_shapes()
    chunks = _chunks_by_tensor(meta.shards)
    with ExitStack() as stack:
        opened: dict[Path, object] = {}
        for name in sorted(n for n in shapes if n.startswith(prefix)):
            shape, stored_dtype = shapes[name]
            whole = torch.empty(shape, dtype=stored_dtype)
            for file, offsets in chunks[name]:
                if file not in opened:
                    opened[file] = stack.enter_context(safe_open(file, framework="pt"))
                piece = opened[file].get_tensor(name)
                whole[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape, strict=True))] = piece
            yield name.removeprefix(prefix), whole if dtype is None else whole.to(dtype)


def full_tensors(checkpoint: Path, prefix: str = MODEL) -> dict[str, torch.Tensor]:
    """All of them at once (small models, tests)."""
    return dict(iter_full_tensors(checkpoint, prefix))


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    number, unit, binary = float(match[1]), match[2].upper(), match[3]
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
            metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, sizes


def consolidate(checkpoint: Path, out_dir: Path, part: str = "model", dtype: torch.dtype | None = None,
                max_file_size: int | None = None) -> list[Path]:
    """Writes the part's whole tensors as safetensors (streamed: the file header first, then one tensor at a
    time) and returns the files written."""
    if part not in PARTS:
        raise ValueError(f"--part must be one of {sorted(PARTS)}")
    meta = verify(checkpoint, contents=True)
    prefix = PARTS[part]
    shapes = {n.removeprefix(prefix): s for n, s in meta.tensor_shapes().items() if n.startswith(prefix)}
    if not shapes:
        raise CheckpointError(f"{checkpoint} holds no '{prefix}' tensors")
    entries = [(name, dtype or shapes[name][1], shapes[name][0]) for name in sorted(shapes)]
    tensors = iter_full_tensors(checkpoint, prefix, check_contents=False, dtype=dtype)
    written = write_safetensors(Path(out_dir), "model" if part == "model" else part, entries, tensors, max_file_size)
    shutil.copyfile(meta.path / "config.yaml", Path(out_dir) / "config.yaml")
    record = {"source": str(meta.path.resolve()), "part": part, "step": meta.step, "layout": meta.layout,
              "state": meta.state}
    (Path(out_dir) / CHECKPOINT_RECORD).write_text(json.dumps(record, indent=2))
    return written


def write_safetensors(out_dir: Path, stem: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[tuple[str, torch.Tensor]], max_file_size: int | None = None,
                      metadata: dict[str, str] | None = None) -> list[Path]:
    """`stem.safetensors`, or `stem-0000K-of-0000N.safetensors` files of at most `max_file_size` bytes each (a
    larger tensor alone in its file) and `stem.safetensors.index.json`, as Hugging Face lays them out. `entries`:
    (name, dtype, shape) of every tensor, in the order `tensors` yields (name, tensor); each tensor is written as it
    comes, so only one is in memory. `metadata`: the header's `__metadata__` (default: {"format": "pt"})."""
    files = _split(entries, max_file_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{stem}.safetensors"] if len(files) == 1 else [
        f"{stem}-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    written = []
    for file_name, file_entries in zip(names, files, strict=True):
        header, sizes = _header(file_entries, metadata)
        tmp = out_dir / f".{file_name}.tmp"
        with open(tmp, "wb") as out:
            out.write(header)
            for (name, dtype, shape), size in zip(file_entries, sizes, strict=True):
                got, tensor = next(tensors)
                assert got == name and tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), (got, name)
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                assert data.nbytes == size
                out.write(data)
        tmp.replace(out_dir / file_name)
        written.append(out_dir / file_name)
    if len(files) > 1:
        weight_map = {name: file_name for file_name, es in zip(names, files, strict=True) for name, _, _ in es}
        total = sum(_nbytes(dtype, shape) for _, dtype, shape in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return written


def _split(entries, max_file_size: int | None) -> list[list]:
    if not max_file_size:
        return [entries]
    files: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if files[-1] and size + nbytes > max_file_size:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    return files
