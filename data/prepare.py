"""`pretrain data prepare`: documents → dedup → train/val split → byte-level BPE → webdataset shards + manifest."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from data.atomic_file import replace_atomically
from data.shards.manifest import Manifest, SplitInfo
from data.shards.writer import ShardWriter, token_dtype
from data.sources import DEFAULT_SOURCES, SourceError, iter_documents
from data.tokenizer import SpecialIds, load_tokenizer, tokenizer_sha256, train_tokenizer

TOKENIZER_FILE = "tokenizer.json"
ENCODE_CHUNK = 512


def progress_enabled() -> bool:
    """Bars on a terminal only; CI logs and pipes get the summary line."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def is_validation(digest: bytes, seed: int, val_fraction: float) -> bool:
    """Whole documents are held out by a seeded hash of their content: stable across runs and source order."""
    h = hashlib.blake2b(digest + seed.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def collect_documents(sources: list[str], min_chars: int = 1) -> tuple[list[str], dict[str, int], int]:
    """Documents of all sources in order, without exact duplicates (same text up to whitespace) and without
    documents shorter than `min_chars`; also the kept count per source and the number of duplicates dropped."""
    docs, counts, seen, duplicates = [], {}, set(), 0
    for source in tqdm(sources, desc="reading sources", disable=not progress_enabled()):
        kept = 0
        for text in iter_documents(source):
            if len(text.strip()) < min_chars:
                continue
            d = _digest(text)
            if d in seen:
                duplicates += 1
                continue
            seen.add(d)
            docs.append(text)
            kept += 1
        counts[source] = kept
    return docs, counts, duplicates


def tokenizer_sample(docs: list[str], max_chars: int, seed: int) -> list[str]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sample, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        sample.append(docs[i])
        total += len(docs[i])
    return sample


def write_split(tokenizer: Tokenizer, docs: list[str], writer: ShardWriter, desc: str) -> SplitInfo:
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress_enabled()) as bar:
        for start in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[start : start + ENCODE_CHUNK]
            for enc in tokenizer.encode_batch(chunk):  # parallel across cores (Rust threads)
                if enc.ids:
                    writer.write(np.asarray(enc.ids, dtype=np.int64))
            bar.update(len(chunk))
    return SplitInfo(writer.close())


def prepare_dataset(
    out_dir: str | Path,
    sources: list[str] | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    shard_tokens: int = 1_000_000,
    seed: int = 0,
    min_chars: int = 8,
    tokenizer_max_chars: int = 30_000_000,
    tokenizer: str | Path | None = None,
) -> Manifest:
    """Writes OUT_DIR/{tokenizer.json, manifest.json, train/*.tar, val/*.tar}; see data/shards/manifest.py.
    `tokenizer`: an existing tokenizer.json to reuse instead of training one (folders to be blended must share
    one tokenizer); `vocab_size` is then ignored."""
    started = time.perf_counter()
    out = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    sources = list(sources or DEFAULT_SOURCES)
    docs, per_source, duplicates = collect_documents(sources, min_chars)
    if not docs:
        raise ValueError(f"no documents found in sources {sources}")
    random.Random(seed).shuffle(docs)  # every shard mixes all sources
    is_val = [is_validation(_digest(d), seed, val_fraction) for d in docs]
    train_docs = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val_docs = [d for d, v in zip(docs, is_val, strict=True) if v]
    if val_fraction > 0 and not val_docs:
        val_docs, train_docs = train_docs[:1], train_docs[1:]
    if not train_docs:
        raise SourceError(f"no training documents: the {len(docs)} document(s) of {', '.join(sources)} all went to "
                          f"validation (--val-fraction {val_fraction}); add documents (a .jsonl file holds one per "
                          "line) or pass --val-fraction 0")

    for stale in ("train", "val", "manifest.json"):
        p = out / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        print(f"training a {vocab_size}-token BPE on up to {tokenizer_max_chars / 1e6:.0f}M characters", flush=True)
        tok = train_tokenizer(tokenizer_sample(train_docs, tokenizer_max_chars, seed), vocab_size)
        replace_atomically(out / TOKENIZER_FILE, lambda aside: tok.save(str(aside)))
    else:
        tok = load_tokenizer(tokenizer)
        # byte-identical, so the sha256 matches the other folders'
        replace_atomically(out / TOKENIZER_FILE, lambda aside: shutil.copyfile(tokenizer, aside))

    dtype = token_dtype(tok.get_vocab_size())
    splits = {
        "train": write_split(tok, train_docs, ShardWriter(out, "train", dtype, shard_tokens), "tokenizing train"),
        "val": write_split(tok, val_docs, ShardWriter(out, "val", dtype, shard_tokens), "tokenizing val"),
    }
    special = SpecialIds.of(tok)
    manifest = Manifest(
        tokenizer_file=TOKENIZER_FILE,
        tokenizer_sha256=tokenizer_sha256(out / TOKENIZER_FILE),
        vocab_size=tok.get_vocab_size(),
        dtype=dtype.name,
        bos_id=special.bos,
        eos_id=special.eos,
        pad_id=special.pad,
        splits=splits,
        sources=per_source,
        duplicates_removed=duplicates,
        seed=seed,
    )
    manifest.save(out)  # written last: a folder without it is an unfinished prepare
    took = time.perf_counter() - started
    print(
        f"prepared {out}: {len(docs):,} documents ({duplicates:,} duplicates removed) from {', '.join(sources)}; "
        f"train {splits['train'].num_tokens:,} tokens in {len(splits['train'].shards)} shards, "
        f"val {splits['val'].num_tokens:,} tokens in {len(splits['val'].shards)} shards; "
        f"vocab {manifest.vocab_size}; {took:.0f} s",
        flush=True,
    )
    return manifest
