"""Byte-level BPE (Hugging Face `tokenizers`): any text round-trips exactly; fixed special-token ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>")
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(8))
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_TOKENS, *RESERVED)


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SpecialIds:
        return cls(tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Special tokens take ids 0..len(SPECIAL_TOKENS)-1, then the 256 byte symbols, then merges."""
    smallest = len(SPECIAL_TOKENS) + 256 + 1
    if vocab_size < smallest:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE (need at least {smallest})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def tokenizer_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
