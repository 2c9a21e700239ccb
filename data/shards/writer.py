"""Writes documents (token arrays) into webdataset `.tar` shards of about `shard_tokens` tokens each."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import webdataset as wds

from data.shards.manifest import ShardInfo


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def member_name(dtype: np.dtype) -> str:
    return f"tokens.{'u16' if dtype == np.uint16 else 'u32'}"


class ShardWriter:
    def __init__(self, data_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.data_dir = Path(data_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        (self.data_dir / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._writer: wds.TarWriter | None = None
        self._docs = self._tokens = 0
        self._next_key = 0

    def _rel_path(self) -> str:
        return f"{self.split}/shard-{len(self.shards):06d}.tar"

    def write(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            # A fixed mtime makes shards (and their checksums) reproducible byte for byte.
            self._writer = wds.TarWriter(str(self.data_dir / self._rel_path()), mtime=0)
        payload = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._writer.write({"__key__": f"{self._next_key:09d}", member_name(self.dtype): payload})
        self._next_key += 1
        self._docs += 1
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        rel = self._rel_path()
        digest = hashlib.sha256((self.data_dir / rel).read_bytes()).hexdigest()
        self.shards.append(ShardInfo(rel, digest, self._docs, self._tokens))
        self._writer, self._docs, self._tokens = None, 0, 0

    def close(self) -> list[ShardInfo]:
        self._close_shard()
        return self.shards
