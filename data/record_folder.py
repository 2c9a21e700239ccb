"""Fine-tuning folders of JSONL records (chat conversations, preference pairs) and how they are written:

    OUT/tokenizer.json   the pretraining tokenizer, copied byte for byte
    OUT/SPLIT.jsonl      one record per line, for each split
    OUT/MANIFEST         written last (a folder without it is an unfinished prepare): the format, the tokenizer file
                         and sha256, vocab size, special ids, per split its file, record count and sha256, the count
                         per source, the seed
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data.tokenizer import SpecialIds, load_tokenizer, tokenizer_sha256

TOKENIZER_FILE = "tokenizer.json"
FOLDER_VERSION = 1


def write_record_folder(out_dir: str | Path, splits: dict[str, list[dict[str, Any]]], tokenizer: str | Path,
                        manifest_file: str, record_format: str, sources: dict[str, int] | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """Writes the folder, each file whole then renamed; returns the manifest as written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / manifest_file).unlink(missing_ok=True)
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer} not found: prepare pretraining data first "
                                "(`pretrain data prepare --out data_cache/tiny`) and pass its tokenizer.json")
    _replace(out / TOKENIZER_FILE, lambda temporary: shutil.copyfile(tokenizer, temporary))
    split_info = {}
    for split, records in splits.items():
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
        _replace(out / f"{split}.jsonl", lambda temporary, text=text: temporary.write_bytes(text))
        split_info[split] = {"file": f"{split}.jsonl", "records": len(records),
                             "sha256": hashlib.sha256(text).hexdigest()}
    loaded = load_tokenizer(out / TOKENIZER_FILE)
    special = SpecialIds.of(loaded)
    manifest = {"format": record_format, "version": FOLDER_VERSION, "tokenizer_file": TOKENIZER_FILE,
                "tokenizer_sha256": tokenizer_sha256(out / TOKENIZER_FILE), "vocab_size": loaded.get_vocab_size(),
                "bos_id": special.bos, "eos_id": special.eos, "pad_id": special.pad, "splits": split_info,
                "sources": sources or {}, "seed": seed}
    _replace(out / manifest_file, lambda temporary: temporary.write_text(json.dumps(manifest, indent=1)))
    return manifest


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)
