"""`pretrain data prepare --format sft`: conversations of the packaged corpora → seeded sample and shuffle →
train/val split by question → a chat folder (data/chat_dataset.py's write_chat_folder):

OUT_DIR/train.jsonl, OUT_DIR/val.jsonl   one conversation per line: {"messages": [{"role", "content"}, …]}
OUT_DIR/tokenizer.json                   a byte-identical copy of the tokenizer the model was pretrained with
OUT_DIR/chat_manifest.json               written last: a folder without it is an unfinished prepare
"""

from __future__ import annotations

from pathlib import Path

from data.chat_dataset import CHAT_MANIFEST
from data.chat_sources import CHAT_SOURCES, Conversation
from data.record_folder import check_prepare_options, prepare_records
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


def prepare_chat_dataset(
    out_dir: str | Path,
    sources: list[str],
    tokenizer: str | Path,
    val_fraction: float = 0.02,
    seed: int = 0,
    max_per_source: int | None = None,
) -> dict:
    """Writes OUT_DIR/{train.jsonl, val.jsonl, tokenizer.json, chat_manifest.json}; returns the manifest.
    Conversations are held out by their user question, so one question never lands in both splits."""
    sources = check_prepare_options(sources, CHAT_SOURCES, "chat", val_fraction, max_per_source)
    check_tokenizer(tokenizer)
    return prepare_records(out_dir, sources, lambda name: CHAT_SOURCES[name](), question, tokenizer,
                           CHAT_MANIFEST, "chat", "conversations", val_fraction, seed, max_per_source)
