"""Preference pairs of the packaged corpora (data/preference_sources.py) → seeded sample and shuffle → train/val
split by prompt → a preference folder (data/record_folder.py):

OUT_DIR/train.jsonl, OUT_DIR/val.jsonl   one pair per line: {"prompt": [{"role", "content"}], "chosen", "rejected"}
OUT_DIR/tokenizer.json                   a byte-identical copy of the tokenizer the model was pretrained with
OUT_DIR/preference_manifest.json         written last: a folder without it is an unfinished prepare
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from data.chat_prepare import check_tokenizer
from data.preference_dataset import PREFERENCE_FORMAT, PREFERENCE_MANIFEST, prompt_key
from data.preference_sources import PREFERENCE_SOURCES, Pair
from data.prepare import _digest, is_validation
from data.record_folder import check_prepare_options, write_record_folder
from data.sources import SourceError


def collect_pairs(sources: list[str], max_per_source: int | None, seed: int) -> dict[str, list[Pair]]:
    """Each source's pairs, in source order; with `max_per_source`, a seeded sample of that many (the sample of one
    source does not depend on which other sources are asked for)."""
    collected = {}
    for name in sources:
        pairs = list(PREFERENCE_SOURCES[name](seed))
        if max_per_source is not None and len(pairs) > max_per_source:
            keep = sorted(random.Random(f"{seed}/{name}").sample(range(len(pairs)), max_per_source))
            pairs = [pairs[i] for i in keep]
        collected[name] = pairs
    return collected


def split_pairs(pairs: list[Pair], seed: int, val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Held out by a seeded hash of the prompt, so one prompt never lands in both splits."""
    keys = [prompt_key(p["prompt"]) for p in pairs]
    is_val = [is_validation(_digest(key), seed, val_fraction) for key in keys]
    if val_fraction > 0 and not any(is_val) and pairs:
        is_val = [key == keys[0] for key in keys]
    train = [p for p, v in zip(pairs, is_val, strict=True) if not v]
    val = [p for p, v in zip(pairs, is_val, strict=True) if v]
    return train, val


def prepare_preference_dataset(
    out_dir: str | Path,
    sources: list[str],
    tokenizer: str | Path,
    val_fraction: float = 0.02,
    seed: int = 0,
    max_per_source: int | None = None,
) -> dict[str, Any]:
    """Writes OUT_DIR/{tokenizer.json, train.jsonl, val.jsonl, preference_manifest.json}; returns the manifest."""
    started = time.perf_counter()
    out = Path(out_dir)
    sources = check_prepare_options(sources, PREFERENCE_SOURCES, "preference", val_fraction, max_per_source)
    check_tokenizer(tokenizer)

    per_source = collect_pairs(sources, max_per_source, seed)
    pairs = [p for name in sources for p in per_source[name]]
    random.Random(seed).shuffle(pairs)  # both splits mix all sources
    train, val = split_pairs(pairs, seed, val_fraction)
    if not train:
        raise SourceError(f"no training pairs: the {len(pairs)} pair(s) of {', '.join(sources)} all went to "
                          "validation; raise max_per_source or pass val_fraction 0")

    manifest = write_record_folder(out, {"train": train, "val": val}, tokenizer, PREFERENCE_MANIFEST,
                                   PREFERENCE_FORMAT, sources={name: len(per_source[name]) for name in sources},
                                   seed=seed)
    counts = ", ".join(f"{name} {count:,}" for name, count in manifest["sources"].items())
    print(f"prepared {out}: {len(pairs):,} preference pairs ({counts}); train {len(train):,}, val {len(val):,}; "
          f"vocab {manifest['vocab_size']}; {time.perf_counter() - started:.0f} s", flush=True)
    return manifest
