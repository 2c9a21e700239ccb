"""Reads a shard back with webdataset, and checks it against the manifest; errors name the shard file."""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from data.shards.manifest import ShardInfo
from data.shards.writer import member_name


class CorruptShardError(ValueError):
    """A shard whose bytes, tar structure or contents do not match its manifest entry."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_shard(path: Path, sha256: str) -> None:
    if not Path(path).is_file():
        raise CorruptShardError(f"shard {path} is missing")
    if sha256_file(path) != sha256:
        raise CorruptShardError(f"shard {path} is corrupt or truncated: its sha256 does not match the manifest")


def read_shard_docs(path: Path, dtype: np.dtype, info: ShardInfo | None = None) -> list[np.ndarray]:
    """The documents of one shard, in stored order."""
    member = member_name(np.dtype(dtype))
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    docs = []
    try:
        for sample in pipeline:
            docs.append(np.frombuffer(sample[member], dtype=dtype))
    except Exception as exc:  # tarfile/webdataset raise several types for damaged archives
        raise CorruptShardError(f"shard {path} cannot be read: {exc}") from exc
    if info is not None:
        n_tokens = sum(len(d) for d in docs)
        if len(docs) != info.num_docs or n_tokens != info.num_tokens:
            raise CorruptShardError(
                f"shard {path} holds {len(docs)} documents / {n_tokens} tokens, "
                f"the manifest says {info.num_docs} / {info.num_tokens}"
            )
    return docs


@dataclass(frozen=True)
class ShardIndex:
    """Where each document's tokens lie in a shard file, from the tar headers alone (no token is read)."""

    offsets: np.ndarray  # byte offset of each document's tokens, in stored order
    lengths: np.ndarray  # tokens per document


def index_shard(path: Path, dtype: np.dtype, info: ShardInfo | None = None) -> ShardIndex:
    """Reads only the tar headers (the tar module seeks over each member's data), so the cost and memory are per
    document, not per token."""
    dtype = np.dtype(dtype)
    suffix = "." + member_name(dtype)
    offsets, sizes = [], []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffix):
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
    except (OSError, tarfile.TarError) as exc:
        raise CorruptShardError(f"shard {path} cannot be read: {exc}") from exc
    offsets_arr, sizes_arr = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
    if len(sizes_arr) and (int((offsets_arr + sizes_arr).max()) > size or (sizes_arr % dtype.itemsize).any()):
        raise CorruptShardError(f"shard {path} is truncated or holds members of the wrong size")
    lengths = sizes_arr // dtype.itemsize
    if info is not None and (len(lengths) != info.num_docs or int(lengths.sum()) != info.num_tokens):
        raise CorruptShardError(
            f"shard {path} holds {len(lengths)} documents / {int(lengths.sum())} tokens, "
            f"the manifest says {info.num_docs} / {info.num_tokens}"
        )
    return ShardIndex(offsets_arr, lengths)


def read_tokens(fd: int, offset: int, count: int, dtype: np.dtype, path: Path) -> np.ndarray:
    """`count` tokens at byte `offset` of an open shard file, read with one positioned read."""
    want = count * dtype.itemsize
    data = os.pread(fd, want, offset)
    if len(data) != want:
        raise CorruptShardError(f"shard {path} ended early: {len(data)} of {want} bytes at offset {offset}")
    return np.frombuffer(data, dtype=dtype)
