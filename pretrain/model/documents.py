"""Packed windows hold several documents: which positions may attend to which, and where each document's
positions start. `document_ids` [batch, seq] numbers the documents of each window in order (the data path
derives them from EOS)."""

from __future__ import annotations

import torch


def same_document(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq]: True where query and key lie in the same document (combined with the causal
    mask by the attention)."""
    return (document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)).unsqueeze(1)


def positions_in_document(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq]: each token's position counted from the start of its own document."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


class Documents:
    """The documents of a batch of packed windows: their ids, and each token's position in its document when RoPE
    should restart per document (None: window positions)."""

    def __init__(self, ids: torch.Tensor, restart_positions: bool = False):
        self.ids = ids
        self.positions = positions_in_document(ids) if restart_positions else None

    def split(self, parts: int) -> list[Documents]:
        """The documents of `parts` equal slices of the batch (micro-batches), in order."""
        positions = self.positions.tensor_split(parts) if self.positions is not None else [None] * parts
        return [Documents.of(ids, pos) for ids, pos in zip(self.ids.tensor_split(parts), positions, strict=True)]

    @classmethod
    def of(cls, ids: torch.Tensor, positions: torch.Tensor | None) -> Documents:
        documents = cls.__new__(cls)
        documents.ids, documents.positions = ids, positions
        return documents
