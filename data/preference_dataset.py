"""DPO data: preference pairs from a prepared folder, packed pair by pair into training windows.

A preference folder holds `preference_manifest.json` (the fields of a chat manifest, with "format": "preference"),
`tokenizer.json` and one JSONL file per split, a pair per line:

    {"prompt": [{"role", "content"}, ... ending with a user turn] or "text", "chosen": "reply", "rejected": "reply"}

A prompt given as text is one user message. Chosen and rejected are each rendered as a whole conversation (the prompt,
then the reply as the assistant's turn) with the chat template, so only the reply and its end-of-turn are supervised.
A pair that breaks the format is an error naming its file and line, or skipped and counted with `skip_invalid`.

Each epoch packs whole pairs, in an order drawn from the seed and the epoch, into windows of `seq_len + 1` tokens
(data/chat_dataset.py's pack_in_order): the window's k-th pair is documents 2k (chosen) and 2k+1 (rejected), side by
side, and the padding after the last pair is a document of its own with nothing supervised. Window `g` of the stream
is a pure function of (data, seed, g), as with chat data, so a run resumes exactly on any number of ranks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.chat import ChatFormatError, ChatTemplate, RenderedConversation, check_messages
from data.chat_dataset import CHAT_MANIFEST, ChatManifest, PackedConversations, load_split, pack_in_order
from data.record_folder import read_records

PREFERENCE_MANIFEST = "preference_manifest.json"
PREFERENCE_FORMAT = "preference"
PAIR_FIELDS = ("prompt", "chosen", "rejected")
_PAIR_ORDER = 0xD90  # tags the seed stream of the epochs' pair orders
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderedPair:
    chosen: RenderedConversation
    rejected: RenderedConversation

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def load_preference_manifest(folder: str | Path) -> ChatManifest:
    path = Path(folder) / PREFERENCE_MANIFEST
    if not path.is_file():
        found = f" (it holds {CHAT_MANIFEST}: a chat folder, for data.format: chat)" \
            if (Path(folder) / CHAT_MANIFEST).is_file() else ""
        raise FileNotFoundError(f"{folder} has no {PREFERENCE_MANIFEST}{found}: prepare preference pairs with "
                                f"`pretrain data prepare --format dpo --out {folder} --tokenizer TOKENIZER.json`")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != PREFERENCE_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, not {PREFERENCE_FORMAT!r}")
        return ChatManifest(**{name: raw[name] for name in ChatManifest.__dataclass_fields__})
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid preference manifest ({exc!r}): prepare the folder again") from None


def prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    """A pair's prompt as chat messages ending with a user turn (text is one user message)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    check_messages(messages, f"{where}: prompt", complete=False)
    return messages


def prompt_key(prompt: Any) -> str:
    """What a prompt is held out by: its messages' text (for a one-question prompt, the question, as chat folders
    are held out by their question: with one seed a question lands in the same split of both)."""
    return "\n".join(m["content"] for m in prompt_messages(prompt, "prompt"))


def read_pairs(path: Path, template: ChatTemplate, max_tokens: int,
               skip_invalid: bool) -> tuple[list[RenderedPair], int]:
    """The pairs of a JSONL file, rendered, and how many invalid ones were skipped."""
    return read_records(path, lambda record, where: _render_pair(record, template, max_tokens, where), skip_invalid,
                        "preference pair")


def _render_pair(record: dict[str, Any], template: ChatTemplate, max_tokens: int, where: str) -> RenderedPair:
    missing = [f"'{field}'" for field in PAIR_FIELDS if field not in record]
    if missing:
        raise ChatFormatError(f"{where}: the pair has no {' and no '.join(missing)}")
    messages = prompt_messages(record["prompt"], where)
    for side in ("chosen", "rejected"):
        if not isinstance(record[side], str) or not record[side].strip():
            raise ChatFormatError(f"{where}: '{side}' must be a non-empty reply (a string)")
    if record["chosen"] == record["rejected"]:
        raise ChatFormatError(f"{where}: 'chosen' and 'rejected' are the same reply: the pair prefers nothing")
    chosen, rejected = (template.render([*messages, {"role": "assistant", "content": record[side]}], where)
                        for side in ("chosen", "rejected"))
    if len(chosen) + len(rejected) > max_tokens:
        raise ChatFormatError(f"{where}: the pair has {len(chosen) + len(rejected)} tokens (chosen {len(chosen)}, "
                              f"rejected {len(rejected)}), more than a window holds (data.seq_len + 1 = {max_tokens}); "
                              "raise data.seq_len or shorten it")
    return RenderedPair(chosen, rejected)


class PackedPairs(PackedConversations):
    """Window `g` of the endless stream of packed pairs, as (g, tokens, supervised, document ids): the documents
    are the pairs' chosen and rejected conversations, pair i's at indices 2i and 2i+1 of the conversation list, so
    the k-th pair of a window is numbered 2k and 2k+1 by PackedConversations' layout."""

    def __init__(self, pairs: list[RenderedPair], seq_len: int, seed: int, pad_id: int):
        super().__init__([c for p in pairs for c in (p.chosen, p.rejected)], seq_len, seed, pad_id)
        self.pairs = pairs
        self.pair_lengths = np.asarray([len(p) for p in pairs])

    def epoch_windows(self, epoch: int) -> list[np.ndarray]:
        """Per window, its conversations (chosen, rejected, chosen, ...) as indices of `self.conversations`."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch, _PAIR_ORDER]).permutation(len(self.pairs))
            windows = pack_in_order(self.pair_lengths, order, self.capacity)
            self._epochs[epoch] = [np.stack([2 * w, 2 * w + 1], axis=1).reshape(-1) for w in windows]
        return self._epochs[epoch]


def load_preference_split(folder: str | Path, split: str, seq_len: int, skip_invalid: bool
                          ) -> tuple[ChatManifest, list[RenderedPair], int]:
    return load_split(folder, split, seq_len, skip_invalid, load_preference_manifest, read_pairs,
                      PREFERENCE_MANIFEST, "preference pair")
