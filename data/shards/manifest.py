"""`manifest.json` of a prepared data folder: the shards of each split with counts and checksums, and the
tokenizer they were written with.

    DATA_DIR/manifest.json  tokenizer.json  train/shard-000000.tar …  val/shard-000000.tar …
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.atomic_file import write_atomically
from data.tokenizer import tokenizer_sha256

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A data folder whose manifest is missing, malformed, or does not match its tokenizer."""


@dataclass
class ShardInfo:
    path: str  # relative to the data folder
    sha256: str
    num_docs: int
    num_tokens: int


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)


@dataclass
class Manifest:
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    bos_id: int
    eos_id: int
    pad_id: int
    splits: dict[str, SplitInfo]
    sources: dict[str, int] = field(default_factory=dict)
    duplicates_removed: int = 0
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        for name, split in self.splits.items():
            d["splits"][name]["num_docs"] = split.num_docs
            d["splits"][name]["num_tokens"] = split.num_tokens
        return json.dumps(d, indent=2)

    def save(self, data_dir: Path) -> None:
        write_atomically(Path(data_dir) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, data_dir: str | Path, check_tokenizer: bool = True) -> Manifest:
        path = Path(data_dir) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{path} not found: run `pretrain data prepare --out {data_dir}` first")
        try:
            d = json.loads(path.read_text())
            splits = {
                name: SplitInfo([ShardInfo(**s) for s in split["shards"]]) for name, split in d.pop("splits").items()
            }
            manifest = cls(splits=splits, **d)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ManifestError(f"{path} is malformed: {exc!r}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise ManifestError(f"{path}: unsupported format_version {manifest.format_version}")
        if check_tokenizer:
            tok = Path(data_dir) / manifest.tokenizer_file
            if not tok.is_file():
                raise ManifestError(f"{tok} (named by {path}) is missing")
            if tokenizer_sha256(tok) != manifest.tokenizer_sha256:
                raise ManifestError(
                    f"{tok} does not match {path}: the shards were written with another tokenizer "
                    "(re-run `pretrain data prepare`)"
                )
        return manifest
