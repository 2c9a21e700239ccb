"""`pretrain data prepare --format sft`: conversations of the packaged corpora → seeded sample and shuffle →
train/val split by question → a chat folder (data/chat_dataset.py's write_chat_folder):

OUT_DIR/train.jsonl, OUT_DIR/val.jsonl   one conversation per line: {"messages": [{"role", "content"}, …]}
OUT_DIR/tokenizer.json                   a byte-identical copy of the tokenizer the model was pretrained with
OUT_DIR/chat_manifest.json               written last: a folder without it is an unfinished prepare
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from data.chat_dataset import CHAT_MANIFEST, write_chat_folder
from data.chat_sources import CHAT_SOURCES, Conversation
from data.prepare import _digest, is_validation
from data.record_folder import check_prepare_options
from data.sources import SourceError
from data.tokenizer import BOS, CHAT_TOKENS, EOS, PAD, load_tokenizer

DEFAULT_CHAT_SOURCES = ("dictionary", "bible")


def question(conversation: Conversation) -> str:
    return conversation["messages"][0]["content"]


def check_tokenizer(path: str | Path) -> None:
    """The tokenizer a chat folder is prepared with exists and carries the special and chat tokens."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"tokenizer {path} not found: pass the tokenizer.json of the pretraining data, e.g. run "
                          "`pretrain data prepare --out data_cache/tiny` first and use "
                          "--tokenizer data_cache/tiny/tokenizer.json")
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:  # tokenizers raises its own exception types for unreadable files
        raise SourceError(f"{path} is not a tokenizer.json the tokenizers library can read ({exc})") from None
    missing = [t for t in (BOS, EOS, PAD, *CHAT_TOKENS) if tokenizer.token_to_id(t) is None]
    if missing:
        raise SourceError(f"tokenizer {path} lacks the special tokens {', '.join(missing)}: use a tokenizer.json "
                          "written by `pretrain data prepare`")


def collect_conversations(sources: list[str], max_per_source: int | None, seed: int) -> dict[str, list[Conversation]]:
    """Each source's conversations, in source order; with `max_per_source`, a seeded sample of that many (the
    sample of one source does not depend on which other sources are asked for)."""
    collected = {}
    for name in sources:
        conversations = list(CHAT_SOURCES[name]())
        if max_per_source is not None and len(conversations) > max_per_source:
            keep = sorted(random.Random(f"{seed}/{name}").sample(range(len(conversations)), max_per_source))
            conversations = [conversations[i] for i in keep]
        collected[name] = conversations
    return collected


def split_conversations(conversations: list[Conversation], seed: int,
                        val_fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """Held out by a seeded hash of the user's question, so one question never lands in both splits."""
    is_val = [is_validation(_digest(question(c)), seed, val_fraction) for c in conversations]
    train = [c for c, v in zip(conversations, is_val, strict=True) if not v]
    val = [c for c, v in zip(conversations, is_val, strict=True) if v]
    if val_fraction > 0 and not val and train:
        moved = question(train[0])
        val = [c for c in train if question(c) == moved]
        train = [c for c in train if question(c) != moved]
    return train, val


def prepare_chat_dataset(
    out_dir: str | Path,
    sources: list[str],
    tokenizer: str | Path,
    val_fraction: float = 0.02,
    seed: int = 0,
    max_per_source: int | None = None,
) -> dict:
    """Writes OUT_DIR/{train.jsonl, val.jsonl, tokenizer.json, chat_manifest.json}; returns the manifest."""
    started = time.perf_counter()
    out = Path(out_dir)
    sources = check_prepare_options(sources, CHAT_SOURCES, "chat", val_fraction, max_per_source)
    check_tokenizer(tokenizer)

    per_source = collect_conversations(sources, max_per_source, seed)
    conversations = [c for name in sources for c in per_source[name]]
    random.Random(seed).shuffle(conversations)  # both splits mix all sources
    train, val = split_conversations(conversations, seed, val_fraction)
    if not train:
        raise SourceError(f"no training conversations: the {len(conversations)} conversation(s) of "
                          f"{', '.join(sources)} all went to validation; raise --max-per-source or pass "
                          "--val-fraction 0")

    write_chat_folder(out, {"train": train, "val": val}, tokenizer,
                      sources={name: len(per_source[name]) for name in sources}, seed=seed)
    manifest = json.loads((out / CHAT_MANIFEST).read_text())
    counts = ", ".join(f"{name} {count:,}" for name, count in manifest["sources"].items())
    print(f"prepared {out}: {len(conversations):,} conversations ({counts}); train {len(train):,}, "
          f"val {len(val):,}; vocab {manifest['vocab_size']}; {time.perf_counter() - started:.0f} s", flush=True)
    return manifest
