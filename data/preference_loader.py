"""The training loader for preference pairs (`data.format: preference`): the chat loader's batching, sampling across
ranks and exact resume, over windows of packed pairs (data/preference_dataset.py).

A batch is the chat loader's: input_ids, labels (the next token where supervised, else -100), document_ids and
window_ids; in each window, documents 2k and 2k+1 are the chosen and rejected replies of its k-th pair."""

from __future__ import annotations

from pathlib import Path

from data.chat_dataset import collate_chat_windows
from data.chat_loader import ChatWindowLoader
from data.preference_dataset import PackedPairs, load_preference_split


class PreferenceWindowLoader(ChatWindowLoader):
    def __init__(self, data_cfg, split: str = "train", micro_batch_size: int = 8, global_batch_size: int = 8,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, reads: bool = True):
        self._set_batching(data_cfg, split, micro_batch_size, global_batch_size, dp_rank, dp_size, seed, reads)
        self.folder = Path(data_cfg.dir)
        self.chat_manifest, pairs, self.skipped_records = load_preference_split(
            self.folder, split, data_cfg.seq_len, data_cfg.skip_invalid_records)
        self.dataset = PackedPairs(pairs, data_cfg.seq_len, seed, self.chat_manifest.pad_id)
        self.collate = collate_chat_windows

    @property
    def pairs(self) -> int:
        return len(self.dataset.pairs)

    @property
    def max_pairs_per_window(self) -> int:
        """A bound on the pairs of any window (capacity // the shortest pair): twice it bounds the documents a
        window's supervised tokens belong to (`max_documents` of pretrain/model/preference_loss.py)."""
        return int(self.dataset.capacity // self.dataset.pair_lengths.min())
