"""The training loader for chat data (`data.format: chat`): the pretraining loader's batching, sampling across ranks
and exact resume, over packed conversations instead of token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from data.chat_dataset import PackedConversations, collate_chat_windows, load_split, records_sha256
from data.loader import TokenWindowLoader


class ChatWindowLoader(TokenWindowLoader):
    def __init__(self, data_cfg, split: str = "train", micro_batch_size: int = 8, global_batch_size: int = 8,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, reads: bool = True):
        self._set_batching(data_cfg, split, micro_batch_size, global_batch_size, dp_rank, dp_size, seed, reads)
        self.folder = Path(data_cfg.dir)
        self.chat_manifest, records, self.skipped_records = self.load_records(data_cfg, split)
        self.dataset = self.packed(records, data_cfg.seq_len, seed, self.chat_manifest.pad_id)
        self.collate = collate_chat_windows

    packed = PackedConversations  # how the records become windows

    def load_records(self, data_cfg, split: str):
        return load_split(self.folder, split, data_cfg.seq_len, data_cfg.skip_invalid_records)

    @property
    def manifest(self):
        return self.chat_manifest

    @property
    def skipped_shards(self) -> list[str]:
        return []

    @property
    def windows_per_epoch(self) -> int:
        return len(self.dataset.epoch_windows(0))

    @property
    def tokens_per_epoch(self) -> int:
        return int(self.dataset.lengths.sum())

    @property
    def conversations(self) -> int:
        return len(self.dataset.conversations)

    def tokenizer_reference(self) -> dict[str, str]:
        return {"path": str((self.folder / self.chat_manifest.tokenizer_file).resolve()),
                "sha256": self.chat_manifest.tokenizer_sha256}

    def data_fingerprint(self) -> list[dict[str, Any]]:
        return [{"dir": str(self.folder), "weight": 1.0, "tokenizer_sha256": self.chat_manifest.tokenizer_sha256,
                 "records_sha256": records_sha256(self.folder, self.chat_manifest, self.split)}]

    def numbered_windows(self) -> Dataset:
        return self.dataset


def build_loader(data_cfg, **options) -> TokenWindowLoader:
    """The loader for `data.format`: token shards (pretraining), chat conversations (SFT) or preference pairs (DPO)."""
    if data_cfg.format == "preference":
        from data.preference_loader import PreferenceWindowLoader

        return PreferenceWindowLoader(data_cfg, **options)
    loader_class = ChatWindowLoader if data_cfg.format == "chat" else TokenWindowLoader
    return loader_class(data_cfg, **options)
