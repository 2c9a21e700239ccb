"""Small real-text data folders shared by the data tests (built once per session, copied when a test damages one)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.prepare import prepare_dataset
from data.shards.manifest import Manifest
from data.shards.reader import read_shard_docs
from data.sources import iter_documents
from pretrain.config import BlendEntry, DataConfig

SEQ_LEN = 32
DUPLICATES = 25


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def fortunes_texts() -> list[str]:
    return list(itertools.islice(iter_documents("fortunes"), 400))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, fortunes_texts) -> Path:
    """400 fortunes plus `DUPLICATES` exact (whitespace-changed) copies; 512-token BPE; ~20 small train shards."""
    src = tmp_path_factory.mktemp("src")
    copies = [t.replace(" ", "  ", 1) + "\n" for t in fortunes_texts[:DUPLICATES]]
    jsonl = write_jsonl(src / "docs.jsonl", fortunes_texts + copies)
    out = tmp_path_factory.mktemp("tiny")
    prepare_dataset(out, sources=[str(jsonl)], vocab_size=512, val_fraction=0.1, shard_tokens=1500, seed=0)
    return out


@pytest.fixture(scope="session")
def bible_dir(tmp_path_factory, tiny_dir) -> Path:
    """30 Bible chapters tokenized with tiny_dir's tokenizer, so the two folders can be blended."""
    src = tmp_path_factory.mktemp("bible_src")
    jsonl = write_jsonl(src / "bible.jsonl", list(itertools.islice(iter_documents("bible"), 30)))
    out = tmp_path_factory.mktemp("bible")
    tokenizer = tiny_dir / "tokenizer.json"
    prepare_dataset(out, sources=[str(jsonl)], val_fraction=0.1, shard_tokens=3000, tokenizer=tokenizer)
    return out


@pytest.fixture
def damaged_dir(tmp_path, tiny_dir) -> Path:
    """A private copy of tiny_dir a test may break."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def data_cfg(*dirs: Path, weights: list[float] | None = None, **kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("seq_len", SEQ_LEN)
    if len(dirs) == 1:
        return DataConfig(dir=str(dirs[0]), **kw)
    weights = weights or [1.0] * len(dirs)
    return DataConfig(blend=[BlendEntry(str(d), w) for d, w in zip(dirs, weights, strict=True)], **kw)


def split_docs(data_dir: Path, split: str) -> list[np.ndarray]:
    manifest = Manifest.load(data_dir)
    return [
        doc
        for info in manifest.splits[split].shards
        for doc in read_shard_docs(data_dir / info.path, np.dtype(manifest.dtype), info)
    ]


def fortune_conversations(fortunes: list[str], count: int, offset: int = 0) -> list[dict]:
    """Real text of very different lengths: a fortune's opening as the question, its rest (or a word) as the reply;
    every third one with a system message, every fifth with a second exchange."""
    conversations = []
    for i, text in enumerate(fortunes[offset:offset + count]):
        words = text.split()
        messages = [{"role": "system", "content": "You finish fortunes."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": " ".join(words[:6])},
                     {"role": "assistant", "content": " ".join(words[6:24]) or "Indeed."}]
        if i % 5 == 0:
            messages += [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": words[0]}]
        conversations.append({"messages": messages})
    return conversations


def write_fortune_chat_folder(out: Path, tokenizer: Path) -> Path:
    """A chat folder of 260 training and 40 validation fortune conversations over `tokenizer`."""
    from data.chat_dataset import write_chat_folder

    fortunes = list(itertools.islice(iter_documents("fortunes"), 300))
    write_chat_folder(out, {"train": fortune_conversations(fortunes, 260),
                            "val": fortune_conversations(fortunes, 40, offset=260)}, tokenizer)
    return out
