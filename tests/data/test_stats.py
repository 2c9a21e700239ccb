"""Corpus statistics: counts agree with the shards, and the unigram baseline behaves like an entropy."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np

from data.shards.manifest import Manifest
from data.stats import cross_entropy_of_unigram, describe, token_counts, unigram_entropy


def test_token_counts_match_manifest(tiny_dir):
    manifest = Manifest.load(tiny_dir)
    for split in ("train", "val"):
        counts = token_counts(tiny_dir, split)
        shards = manifest.splits[split].shards
        assert counts.sum() == sum(s.num_tokens for s in shards) + sum(s.num_docs for s in shards)
        assert counts[manifest.eos_id] == sum(s.num_docs for s in shards)


def test_unigram_entropy_bounds():
    assert unigram_entropy(np.array([5, 5, 5, 5])) == math.log(4)
    assert unigram_entropy(np.array([7, 0, 0])) == 0.0
    skewed = unigram_entropy(np.array([90, 5, 5]))
    assert 0 < skewed < math.log(3)


def test_cross_entropy_is_at_least_the_entropy_of_the_eval_counts():
    train = np.array([50, 30, 20])
    assert cross_entropy_of_unigram(train, train) >= unigram_entropy(train)
    assert cross_entropy_of_unigram(train, np.array([0, 0, 10])) > cross_entropy_of_unigram(train, train)


def test_describe_and_cli(tiny_dir):
    stats = describe(tiny_dir)
    assert stats["unigram_entropy_train"] < stats["uniform_loss"] == math.log(Manifest.load(tiny_dir).vocab_size)
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "data", "stats", str(tiny_dir)],
                         capture_output=True, text=True, check=True).stdout
    assert "unigram_loss_val" in out and f"{stats['train_tokens']:,}" in out
