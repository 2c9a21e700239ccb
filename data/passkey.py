"""Passkey retrieval (Mohtashami & Jaggi, 2023): a random number hidden in repeated filler text, asked for at the end.

One template serves both sides: synthetic training documents (the `passkey:COUNT:MAX_CHARS` source, for models too
small to pick up retrieval from natural text) and the evaluation prompts of `pretrain eval --tasks passkey`, which
fill a prompt to an exact token length and hide the key at a given depth.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def random_key(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def prompt_text(key: str, fillers_before: int, fillers_after: int) -> str:
    """Everything up to the question; the expected continuation is ' KEY.'"""
    parts = [INTRO, *[FILLER] * fillers_before, key_sentence(key), *[FILLER] * fillers_after, QUESTION]
    return " ".join(parts)


def training_document(rng: random.Random, max_chars: int) -> str:
    """A prompt with between 0 and about `max_chars` characters of filler, the key at a uniform depth, answered."""
    fillers = rng.randint(0, max(0, max_chars // (len(FILLER) + 1)))
    before = rng.randint(0, fillers)
    key = random_key(rng)
    return f"{prompt_text(key, before, fillers - before)} {key}."


def training_documents(count: int, max_chars: int, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        yield training_document(rng, max_chars)


def parse_source(spec: str) -> tuple[int, int]:
    """`passkey:COUNT:MAX_CHARS` -> (COUNT, MAX_CHARS); ValueError with the expected form otherwise."""
    parts = spec.split(":")
    try:
        count, max_chars = int(parts[1]), int(parts[2])
        if len(parts) != 3 or count < 1 or max_chars < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"'{spec}': write the synthetic passkey source as passkey:COUNT:MAX_CHARS, e.g. "
                         "passkey:2000:1000 (2,000 documents with up to 1,000 characters of filler)") from None
    return count, max_chars


@dataclass(frozen=True)
class PasskeyPrompt:
    key: str
    token_ids: list[int]
    depth: float  # where the key sentence sits in the filler: 0 = first, 1 = last


def build_prompt(encode: Callable[[str], list[int]], key: str, length: int, depth: float) -> PasskeyPrompt:
    """The longest prompt of at most `length` tokens with the key at `depth` of its filler (by filler count)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")

    def tokens(fillers: int) -> list[int]:
        before = round(fillers * depth)
        return encode(prompt_text(key, before, fillers - before))

    if len(tokens(0)) > length:
        raise ValueError(f"a passkey prompt needs more than {length} tokens even without filler")
    low, high = 0, 1
    while len(tokens(high)) <= length:  # grow, then bisect on the filler count
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if len(tokens(mid)) <= length else (low, mid)
    return PasskeyPrompt(key, tokens(low), depth)
