"""Keys and values of the positions decoded so far, per attention layer (inference only).

Each layer appends the keys and values of the new positions and attends over all of them; `truncate` drops the
positions after a given length (speculative decoding rolls back rejected drafts). MLA caches its expanded per-head
keys and values, not the compressed latent: simple, and the same for both attentions; caching the latent (what
makes MLA's cache small) is left for serving work.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [batch, heads, positions, dim]
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the new positions' keys and values; returns those of every cached position."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


class KVCache:
    """One `LayerCache` per block of the main model."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)
