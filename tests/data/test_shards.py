"""Shards round-trip through webdataset; damaged shards and tokenizer mismatches are named errors."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data.shards.manifest import Manifest, ManifestError
from data.shards.reader import CorruptShardError, index_shard, read_shard_docs, verify_shard
from data.shards.writer import ShardWriter


def write_docs(tmp_path, dtype=np.uint16, high=60000):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, high, size=int(rng.integers(1, 300))) for _ in range(50)]
    writer = ShardWriter(tmp_path, "train", np.dtype(dtype), shard_tokens=2000)
    for d in docs:
        writer.write(d)
    return docs, writer.close()


@pytest.mark.parametrize("dtype,high,member", [(np.uint16, 60000, "tokens.u16"), (np.uint32, 100_000, "tokens.u32")])
def test_shard_write_read_round_trip(tmp_path, dtype, high, member):
    docs, shards = write_docs(tmp_path, dtype, high)
    assert len(shards) > 1
    assert sum(s.num_docs for s in shards) == 50 and sum(s.num_tokens for s in shards) == sum(map(len, docs))
    back = [d for s in shards for d in read_shard_docs(tmp_path / s.path, dtype, s)]
    assert len(back) == 50 and all(np.array_equal(a, b) for a, b in zip(docs, back, strict=True))
    for s in shards:
        verify_shard(tmp_path / s.path, s.sha256)
    # A plain webdataset pipeline reads the same shards.
    samples = list(wds.WebDataset([str(tmp_path / s.path) for s in shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(50)]
    assert all(np.array_equal(np.frombuffer(s[member], dtype), d) for s, d in zip(samples, docs, strict=True))


def test_flipped_byte_fails_checksum_naming_the_shard(tmp_path):
    _, shards = write_docs(tmp_path)
    path = tmp_path / shards[1].path
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=path.name):
        verify_shard(path, shards[1].sha256)


@pytest.mark.parametrize("where", ["middle", "inside_last_member"])
def test_truncated_shard_is_named_when_read(tmp_path, where):
    _, shards = write_docs(tmp_path)
    path = tmp_path / shards[0].path
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    cut = path.stat().st_size // 2 if where == "middle" else last.offset_data + last.size // 2
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CorruptShardError, match=path.name):
        read_shard_docs(path, np.uint16, shards[0])
    with pytest.raises(CorruptShardError, match=path.name):
        verify_shard(path, shards[0].sha256)


def test_manifest_rejects_another_tokenizer(damaged_dir):
    Manifest.load(damaged_dir)
    tok_path = damaged_dir / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["added_tokens"][0]["content"] = "<|changed|>"
    tok_path.write_text(json.dumps(tok))
    with pytest.raises(ManifestError, match="tokenizer"):
        Manifest.load(damaged_dir)


def test_manifest_records_splits_and_totals(tiny_dir):
    m = json.loads((tiny_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["vocab_size"] == 512
    assert (m["bos_id"], m["eos_id"], m["pad_id"]) == (0, 1, 2)
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert shards and all((tiny_dir / s["path"]).is_file() for s in shards)
        assert m["splits"][split]["num_tokens"] == sum(s["num_tokens"] for s in shards)
        assert m["splits"][split]["num_docs"] == sum(s["num_docs"] for s in shards)


def documents_at(path, index, dtype) -> list[np.ndarray]:
    data = path.read_bytes()
    return [np.frombuffer(data[o : o + n * np.dtype(dtype).itemsize], dtype=dtype)
            for o, n in zip(index.offsets, index.lengths, strict=True)]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 60000), (np.uint32, 100_000)])
def test_index_from_headers_finds_every_document(tmp_path, dtype, high):
    docs, shards = write_docs(tmp_path, dtype, high)
    for info in shards:
        index = index_shard(tmp_path / info.path, dtype, info, sha256=info.sha256)
        back = read_shard_docs(tmp_path / info.path, dtype, info)
        assert all(np.array_equal(a, b) for a, b in zip(documents_at(tmp_path / info.path, index, dtype), back,
                                                        strict=True))


def test_index_of_an_archive_with_extended_headers(tmp_path):
    """Archives written by other tools may carry pax headers (here a non-ASCII name): indexed through tarfile."""
    docs = [np.arange(n, dtype=np.uint16) for n in (5, 700, 3)]
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, doc in zip(["000000000", "gr\u00fc\u00dfe", "000000002"], docs, strict=True):
            member = tarfile.TarInfo(f"{key}.tokens.u16")
            member.size = doc.nbytes
            tar.addfile(member, io.BytesIO(doc.tobytes()))
    index = index_shard(path, np.uint16)
    assert all(np.array_equal(a, b) for a, b in zip(documents_at(path, index, np.uint16), docs, strict=True))
