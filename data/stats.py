"""Corpus statistics from the shards: token counts and the unigram entropy, the loss a model that ignores
context would reach (a trained LM must get clearly below it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data.shards.manifest import Manifest
from data.shards.reader import read_shard_docs


def token_counts(data_dir: str | Path, split: str = "train", include_eos: bool = True) -> np.ndarray:
    manifest = Manifest.load(data_dir)
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    for info in manifest.splits[split].shards:
        for doc in read_shard_docs(Path(data_dir) / info.path, np.dtype(manifest.dtype), info):
            counts += np.bincount(doc, minlength=manifest.vocab_size)
        if include_eos:
            counts[manifest.eos_id] += info.num_docs
    return counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the empirical unigram distribution."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def cross_entropy_of_unigram(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Loss (nats/token) on `eval_counts` of the add-one-smoothed unigram model fitted to `train_counts`."""
    q = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    return float(-(eval_counts * np.log(q)).sum() / eval_counts.sum())


def describe(data_dir: str | Path) -> dict[str, float]:
    train, val = token_counts(data_dir, "train"), token_counts(data_dir, "val")
    return {
        "train_tokens": int(train.sum()),
        "val_tokens": int(val.sum()),
        "unigram_entropy_train": unigram_entropy(train),
        "unigram_loss_val": cross_entropy_of_unigram(train, val),
        "uniform_loss": math.log(len(train)),
    }
