"""The weights of a Hugging Face model folder: `model.safetensors`, or the files `model.safetensors.index.json`
names. Headers are read and checked against the files' sizes first (a truncated or garbled file is an error naming
it); tensors are then memory-mapped views of the files, so no more of them is in memory than what is being read.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.hf import ConversionError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor computed from others only when it is written (e.g. experts stacked), so that a streamed conversion
    holds one at a time."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def _header(file: Path) -> dict[str, StoredTensor]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise ConversionError(f"{file} is not a safetensors file or is truncated: its header length does not fit "
                                  f"its {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{file}: the safetensors header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    data_start, out = 8 + length, {}
    for name, entry in header.items():
        try:
            dtype, shape = DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{file}: the header entry of '{name}' is malformed ({exc!r})") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ConversionError(f"{file}: '{name}' spans bytes {begin}..{end}, not the size of {list(shape)} "
                                  f"{entry['dtype']}")
        if data_start + end > size:
            raise ConversionError(f"{file} is truncated: '{name}' ends at byte {data_start + end}, the file has {size}")
        out[name] = StoredTensor(file, dtype, shape, data_start + begin, end - begin)
    return out


def read_folder(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's weights by name, its file's header checked."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(f"{folder / INDEX} is not a safetensors index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        raise ConversionError(f"{folder} holds neither {SINGLE} nor {INDEX} (weights in pytorch_model.bin are not "
                              "read: save the model with safetensors)")
    stored: dict[str, StoredTensor] = {}
    for name in files:
        if Path(name).name != name:
            raise ConversionError(f"{folder / INDEX} names {name}, a file outside the folder: refused")
        if not (folder / name).is_file():
            raise ConversionError(f"{folder / INDEX} names {name}, which is not in {folder}")
        stored |= _header(folder / name)
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in stored or stored[name].file.name != file:
                raise ConversionError(f"{folder / INDEX} puts '{name}' in {file}, whose header does not hold it")
    return stored


class MappedFiles:
    """Tensors as views of memory-mapped files (copy-on-write: nothing is written back)."""

    def __init__(self) -> None:
        self.maps: dict[Path, mmap.mmap] = {}

    def tensor(self, stored: StoredTensor) -> torch.Tensor:
        if stored.file not in self.maps:
            with open(stored.file, "rb") as f:
                self.maps[stored.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if stored.nbytes == 0:
            return torch.empty(stored.shape, dtype=stored.dtype)
        flat = torch.frombuffer(self.maps[stored.file], dtype=torch.uint8, count=stored.nbytes, offset=stored.start)
        return flat.view(stored.dtype).view(stored.shape)
