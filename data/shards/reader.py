"""Reads a shard back with webdataset, and checks it against the manifest; errors name the shard file."""

from __future__ import annotations

import hashlib
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
