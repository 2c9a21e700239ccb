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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data.atomic_file import replace_atomically, write_atomically
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
    replace_atomically(out / TOKENIZER_FILE, lambda aside: shutil.copyfile(tokenizer, aside))
    split_info = {}
    for split, records in splits.items():
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
        write_atomically(out / f"{split}.jsonl", text)
        split_info[split] = {"file": f"{split}.jsonl", "records": len(records),
                             "sha256": hashlib.sha256(text).hexdigest()}
    loaded = load_tokenizer(out / TOKENIZER_FILE)
    special = SpecialIds.of(loaded)
    manifest = {"format": record_format, "version": FOLDER_VERSION, "tokenizer_file": TOKENIZER_FILE,
                "tokenizer_sha256": tokenizer_sha256(out / TOKENIZER_FILE), "vocab_size": loaded.get_vocab_size(),
                "bos_id": special.bos, "eos_id": special.eos, "pad_id": special.pad, "splits": split_info,
                "sources": sources or {}, "seed": seed}
    write_atomically(out / manifest_file, json.dumps(manifest, indent=1))
    return manifest


def read_records(path: Path, render: Callable[[dict[str, Any], str], Any], skip_invalid: bool,
                 what: str) -> tuple[list[Any], int]:
    """`render(record, "FILE:LINE")` of every JSON object line of a JSONL file, and how many lines were skipped as
    invalid (`skip_invalid`; else the first invalid one raises). Invalid: not UTF-8, not a JSON object, or whatever
    `render` raises ChatFormatError for."""
    from data.chat import ChatFormatError

    items, skipped = [], 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                items.append(render(json_object(raw, where), where))
            except ChatFormatError:
                if not skip_invalid:
                    raise
                skipped += 1
    if not items:
        raise ChatFormatError(f"{path} holds no usable {what} ({skipped} skipped)")
    return items, skipped


def json_object(raw: bytes, where: str) -> dict[str, Any]:
    from data.chat import ChatFormatError

    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ChatFormatError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ChatFormatError(f"{where}: not a JSON object ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ChatFormatError(f"{where}: expected an object {{...}}, got a JSON {type(record).__name__}")
    return record


def check_prepare_options(sources: list[str], known: Any, what: str, val_fraction: float,
                          max_per_source: int | None) -> list[str]:
    """The sources without repeats, or a clear error for unknown sources and out-of-range options."""
    from data.sources import SourceError

    sources = list(dict.fromkeys(sources))
    unknown = [s for s in sources if s not in known]
    if unknown or not sources:
        raise SourceError(f"unknown {what} source(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(known)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_per_source is not None and max_per_source < 1:
        raise ValueError(f"--max-per-source must be at least 1, got {max_per_source}")
    return sources


def prepare_records(out_dir: str | Path, sources: list[str], records_of: Callable[[str], Any],
                    split_key: Callable[[dict[str, Any]], str], tokenizer: str | Path, manifest_file: str,
                    record_format: str, noun: str, val_fraction: float, seed: int,
                    max_per_source: int | None) -> dict[str, Any]:
    """`pretrain data prepare` for records of packaged sources (already checked by `check_prepare_options`): each
    source's records (`records_of(name)`), a seeded sample of `max_per_source` per source (one source's sample does
    not depend on the others asked for), shuffled together, split by a seeded hash of `split_key(record)` (records
    sharing a key share a split; an empty validation split takes the first key's records), written with
    `write_record_folder`. `noun`: what the records are called in messages (plural)."""
    import random
    import time

    from data.prepare import _digest, is_validation
    from data.sources import SourceError

    started = time.perf_counter()
    per_source = {}
    for name in sources:
        records = list(records_of(name))
        if max_per_source is not None and len(records) > max_per_source:
            keep = sorted(random.Random(f"{seed}/{name}").sample(range(len(records)), max_per_source))
            records = [records[i] for i in keep]
        per_source[name] = records
    records = [r for name in sources for r in per_source[name]]
    random.Random(seed).shuffle(records)  # both splits mix all sources
    keys = [split_key(r) for r in records]
    is_val = [is_validation(_digest(key), seed, val_fraction) for key in keys]
    if val_fraction > 0 and not any(is_val) and records:
        is_val = [key == keys[0] for key in keys]
    train = [r for r, v in zip(records, is_val, strict=True) if not v]
    val = [r for r, v in zip(records, is_val, strict=True) if v]
    if not train:
        raise SourceError(f"no training {noun}: the {len(records)} {noun} of {', '.join(sources)} all went to "
                          "validation; raise --max-per-source or pass --val-fraction 0")
    manifest = write_record_folder(out_dir, {"train": train, "val": val}, tokenizer, manifest_file, record_format,
                                   sources={name: len(per_source[name]) for name in sources}, seed=seed)
    counts = ", ".join(f"{name} {count:,}" for name, count in manifest["sources"].items())
    print(f"prepared {out_dir}: {len(records):,} {noun} ({counts}); train {len(train):,}, val {len(val):,}; "
          f"vocab {manifest['vocab_size']}; {time.perf_counter() - started:.0f} s", flush=True)
    return manifest
