"""Supervised fine-tuning data: chat conversations from a prepared folder, packed into training windows.

A folder from `pretrain data prepare --format sft` holds `chat_manifest.json`, `tokenizer.json` and one JSONL file
per split (`{"messages": [{"role", "content"}, ...]}` per line). Every conversation is rendered with the chat template
when the loader starts (an invalid one is an error naming its file and line, or skipped and counted with
`data.skip_invalid_records`), then each epoch packs the conversations, in an order drawn from the seed and the epoch,
into windows of `seq_len + 1` tokens: whole conversations only, the rest padded. A window carries its tokens, the
labels (the next token where it is supervised, else the ignore index), and each position's conversation number for
document masking. Window `g` of the stream is a pure function of (data, seed, g), so a run resumes exactly on any
number of ranks, as the pretraining stream does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data.chat import ChatFormatError, ChatTemplate, RenderedConversation
from data.record_folder import read_records, write_record_folder
from data.tokenizer import load_tokenizer

CHAT_MANIFEST = "chat_manifest.json"
IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatManifest:
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    splits: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, folder: str | Path) -> ChatManifest:
        path = Path(folder) / CHAT_MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {CHAT_MANIFEST}: prepare chat data with "
                                    f"`pretrain data prepare --format sft --out {folder} --tokenizer TOKENIZER.json`")
        try:
            raw = json.loads(path.read_text())
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid chat manifest ({exc!r}): prepare the folder again") from None


def read_conversations(path: Path, template: ChatTemplate, max_tokens: int,
                       skip_invalid: bool) -> tuple[list[RenderedConversation], int]:
    """The conversations of a JSONL file, rendered, and how many invalid ones were skipped."""
    return read_records(path, lambda record, where: _render(record, template, max_tokens, where), skip_invalid,
                        "conversation")


def _render(record: dict[str, Any], template: ChatTemplate, max_tokens: int, where: str) -> RenderedConversation:
    if "messages" not in record:
        raise ChatFormatError(f"{where}: expected an object with a 'messages' list")
    conversation = template.render(record["messages"], where)
    if len(conversation) > max_tokens:
        raise ChatFormatError(f"{where}: the conversation has {len(conversation)} tokens, more than a window holds "
                              f"(data.seq_len + 1 = {max_tokens}); raise data.seq_len or shorten it")
    return conversation


def pack_in_order(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Conversations taken in `order`, each into the current window if it fits, else into a new one."""
    windows, current, used = [], [], 0
    for index in order:
        if used + lengths[index] > capacity:
            windows.append(np.asarray(current))
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        windows.append(np.asarray(current))
    return windows


class PackedConversations(Dataset):
    """Window `g` of the endless stream of packed conversations, as (g, tokens, supervised, conversation ids)."""

    def __init__(self, conversations: list[RenderedConversation], seq_len: int, seed: int, pad_id: int):
        self.conversations = conversations
        self.lengths = np.asarray([len(c) for c in conversations])
        self.capacity, self.seed, self.pad_id = seq_len + 1, seed, pad_id
        self._epochs: dict[int, list[np.ndarray]] = {}
        self._epoch_starts = [0]

    def epoch_windows(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch, 0x5F7]).permutation(len(self.conversations))
            self._epochs[epoch] = pack_in_order(self.lengths, order, self.capacity)
        return self._epochs[epoch]

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, window in it) of stream window `g`."""
        while self._epoch_starts[-1] <= g:  # the first window of each epoch, counted once
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_windows(epoch)))
            self._epochs.pop(epoch - 2, None)  # readers move forward: older packings are not needed again
        epoch = int(np.searchsorted(self._epoch_starts, g, side="right")) - 1
        return epoch, g - self._epoch_starts[epoch]

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs a number
        return 2**62

    def __getitem__(self, g: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        epoch, index = self.locate(g)
        members = self.epoch_windows(epoch)[index]
        tokens = np.full(self.capacity, self.pad_id, dtype=np.int64)
        supervised = np.zeros(self.capacity, dtype=bool)
        conversation_ids = np.full(self.capacity, len(members), dtype=np.int64)  # padding: a document of its own
        start = 0
        for number, member in enumerate(members):
            conversation = self.conversations[member]
            end = start + len(conversation)
            tokens[start:end], supervised[start:end], conversation_ids[start:end] = (
                conversation.ids, conversation.supervised, number)
            start = end
        return g, tokens, supervised, conversation_ids


def collate_chat_windows(windows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Inputs, labels (ignored where the next token is not supervised), document ids, window ids."""
    tokens = torch.from_numpy(np.stack([w[1] for w in windows]))
    supervised = torch.from_numpy(np.stack([w[2] for w in windows]))
    conversation_ids = torch.from_numpy(np.stack([w[3] for w in windows]))
    labels = tokens[:, 1:].masked_fill(~supervised[:, 1:], IGNORE_INDEX)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels.contiguous(),
            "document_ids": conversation_ids[:, :-1].contiguous(),
            "window_ids": torch.tensor([w[0] for w in windows], dtype=torch.long)}


def load_split(folder: str | Path, split: str, seq_len: int, skip_invalid: bool, load_manifest=None,
               read=None, manifest_file: str = CHAT_MANIFEST, noun: str = "conversation"
               ) -> tuple[ChatManifest, list[Any], int]:
    """A split of a record folder, rendered: its manifest, records and the count of skipped invalid ones. The
    defaults read a chat folder; `load_manifest`, `read` (like read_conversations), `manifest_file` and `noun` serve
    other record formats."""
    manifest = (load_manifest or ChatManifest.load)(folder)
    if split not in manifest.splits:
        raise ValueError(f"{Path(folder) / manifest_file} has no '{split}' split (it has {sorted(manifest.splits)})")
    template = ChatTemplate(load_tokenizer(Path(folder) / manifest.tokenizer_file))
    path = Path(folder) / manifest.splits[split]["file"]
    records, skipped = (read or read_conversations)(path, template, seq_len + 1, skip_invalid)
    if skipped:
        log.warning("%s: skipped %d invalid %s(s) (data.skip_invalid_records)", path, skipped, noun)
    return manifest, records, skipped


def records_sha256(folder: str | Path, manifest: ChatManifest, split: str) -> str:
    recorded = manifest.splits[split].get("sha256")
    if recorded:
        return recorded
    return hashlib.sha256((Path(folder) / manifest.splits[split]["file"]).read_bytes()).hexdigest()


def write_chat_folder(out_dir: str | Path, splits: dict[str, list[dict[str, Any]]], tokenizer: str | Path,
                      sources: dict[str, int] | None = None, seed: int = 0) -> ChatManifest:
    """OUT/{tokenizer.json, SPLIT.jsonl..., chat_manifest.json}: each file written whole then renamed, the manifest
    last (a folder without it is an unfinished prepare); the tokenizer copied byte for byte."""
    written = write_record_folder(out_dir, splits, tokenizer, CHAT_MANIFEST, "chat", sources, seed)
    return ChatManifest(**{name: written[name] for name in ChatManifest.__dataclass_fields__})
