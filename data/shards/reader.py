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


_BLOCK = 1 << 20
_TAR_HEADER = 512
_REGULAR_FILE = (b"0", b"\0")


def index_shard(path: Path, dtype: np.dtype, info: ShardInfo | None = None, sha256: str | None = None) -> ShardIndex:
    """Each document's byte offset and token count, from one sequential pass over the file in 1 MiB blocks: the
    tar headers are parsed on the way (members' data is skipped, not decoded) and, with `sha256`, the bytes are
    hashed and checked on the same pass, so a shard is read once to index and verify it. Memory: one block plus
    16 bytes per document. Archives with extended (pax/GNU) headers go through the `tarfile` module instead."""
    dtype = np.dtype(dtype)
    suffix = ("." + member_name(dtype)).encode()
    digest = hashlib.sha256() if sha256 else None
    offsets, sizes = [], []
    pending, start, header_at, ended = bytearray(), 0, 0, False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_BLOCK):
                if digest is not None:
                    digest.update(chunk)
                if ended:
                    continue
                pending += chunk
                while header_at - start + _TAR_HEADER <= len(pending):
                    header = bytes(pending[header_at - start : header_at - start + _TAR_HEADER])
                    if not any(header):
                        ended = True
                        break
                    name, kind, size = _parse_header(header, path, header_at)
                    if kind not in _REGULAR_FILE:
                        return _index_with_tarfile(path, dtype, info, sha256)
                    if name.endswith(suffix):
                        offsets.append(header_at + _TAR_HEADER)
                        sizes.append(size)
                    header_at += _TAR_HEADER + -(-size // _TAR_HEADER) * _TAR_HEADER
                drop = min(header_at - start, len(pending))
                del pending[:drop]
                start += drop
    except OSError as exc:
        raise CorruptShardError(f"shard {path} cannot be read: {exc}") from exc
    if digest is not None and digest.hexdigest() != sha256:
        raise CorruptShardError(f"shard {path} is corrupt or truncated: its sha256 does not match the manifest")
    if not ended:
        raise CorruptShardError(f"shard {path} is truncated: the tar archive has no end")
    return _checked_index(path, dtype, info, offsets, sizes)


def _parse_header(header: bytes, path: Path, at: int) -> tuple[bytes, bytes, int]:
    def octal(field: bytes) -> int:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)

    try:
        stored, size = octal(header[148:156]), octal(header[124:136])
    except ValueError as exc:
        raise CorruptShardError(f"shard {path} has a damaged tar header at byte {at}") from exc
    if stored != sum(header[:148]) + sum(header[156:]) + 8 * ord(" "):
        raise CorruptShardError(f"shard {path} has a damaged tar header at byte {at} (checksum)")
    return header[:100].split(b"\0", 1)[0], header[156:157], size


def _index_with_tarfile(path: Path, dtype: np.dtype, info: ShardInfo | None, sha256: str | None) -> ShardIndex:
    if sha256:
        verify_shard(path, sha256)
    suffix = "." + member_name(dtype)
    offsets, sizes = [], []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffix):
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
    except (OSError, tarfile.TarError) as exc:
        raise CorruptShardError(f"shard {path} cannot be read: {exc}") from exc
    return _checked_index(path, dtype, info, offsets, sizes)


def _checked_index(path: Path, dtype: np.dtype, info: ShardInfo | None, offsets: list[int],
                   sizes: list[int]) -> ShardIndex:
    offsets_arr, sizes_arr = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
    if len(sizes_arr) and (int((offsets_arr + sizes_arr).max()) > os.path.getsize(path)
                           or (sizes_arr % dtype.itemsize).any()):
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
