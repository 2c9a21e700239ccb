"""The training loader for preference pairs (`data.format: preference`): the chat loader's batching, sampling across
ranks and exact resume, over windows of packed pairs (data/preference_dataset.py).

A batch is the chat loader's: input_ids, labels (the next token where supervised, else -100), document_ids and
window_ids; in each window, documents 2k and 2k+1 are the chosen and rejected replies of its k-th pair."""

from __future__ import annotations

from data.chat_loader import ChatWindowLoader
from data.preference_dataset import PackedPairs, load_preference_split


class PreferenceWindowLoader(ChatWindowLoader):
    packed = PackedPairs

    def load_records(self, data_cfg, split: str):
        return load_preference_split(self.folder, split, data_cfg.seq_len, data_cfg.skip_invalid_records)

    @property
    def pairs(self) -> int:
        return len(self.dataset.pairs)

    @property
    def max_pairs_per_window(self) -> int:
        """A bound on the pairs of any window (capacity // the shortest pair): twice it bounds the documents a
        window's supervised tokens belong to (`max_documents` of pretrain/model/preference_loss.py)."""
        return int(self.dataset.capacity // self.dataset.pair_lengths.min())
