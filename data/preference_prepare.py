"""Preference pairs of the packaged corpora (data/preference_sources.py) → seeded sample and shuffle → train/val
split by prompt → a preference folder (data/record_folder.py):

OUT_DIR/train.jsonl, OUT_DIR/val.jsonl   one pair per line: {"prompt": [{"role", "content"}], "chosen", "rejected"}
OUT_DIR/tokenizer.json                   a byte-identical copy of the tokenizer the model was pretrained with
OUT_DIR/preference_manifest.json         written last: a folder without it is an unfinished prepare
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.chat_prepare import check_tokenizer
from data.preference_dataset import PREFERENCE_FORMAT, PREFERENCE_MANIFEST, prompt_key
from data.preference_sources import PREFERENCE_SOURCES
from data.record_folder import check_prepare_options, prepare_records


def prepare_preference_dataset(
    out_dir: str | Path,
    sources: list[str],
    tokenizer: str | Path,
    val_fraction: float = 0.02,
    seed: int = 0,
    max_per_source: int | None = None,
) -> dict[str, Any]:
    """Writes OUT_DIR/{tokenizer.json, train.jsonl, val.jsonl, preference_manifest.json}; returns the manifest.
    Pairs are held out by their prompt, so one prompt never lands in both splits."""
    sources = check_prepare_options(sources, PREFERENCE_SOURCES, "preference", val_fraction, max_per_source)
    check_tokenizer(tokenizer)
    return prepare_records(out_dir, sources, lambda name: PREFERENCE_SOURCES[name](seed),
                           lambda pair: prompt_key(pair["prompt"]), tokenizer, PREFERENCE_MANIFEST,
                           PREFERENCE_FORMAT, "preference pairs", val_fraction, seed, max_per_source)
