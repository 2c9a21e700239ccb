"""Greedy decoding, and self-speculative decoding with the model's own MTP modules.

Both keep KV caches by default (each forward runs only the new positions; the MTP modules' caches keep the
positions that depend on accepted tokens only, see `MTPDrafter`); `use_cache=False` recomputes the whole
sequence every forward (the reference the caches are tested against).

Self-speculative decoding: one forward of the main model gives the next token t1 and the last hidden state;
the MTP modules then draft t2..t(D+1) (depth k embeds the token the previous depth produced), and one more
forward of the main model over t1 and the drafts verifies them: drafts are kept while they equal the main
model's own greedy choice, the first disagreement is replaced by that choice, and the cache drops the rejected
positions. The output is exactly greedy decoding's; what changes is how many main-model forwards it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.model.kv_cache import KVCache, LayerCache
from pretrain.model.transformer import Transformer


@dataclass
class DecodeStats:
    tokens: int = 0
    main_forwards: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _hidden_and_logits(model: Transformer, ids: torch.Tensor, cache: KVCache | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and logits of `ids` (with a cache: the positions after the cached ones, which it then holds)."""
    h = model.forward_layers(model.embed(ids), model.layers, ids.shape[1], cache)
    return h, model.lm_head(model.norm(h))


def new_cache(model: Transformer, use_cache: bool) -> KVCache | None:
    return KVCache(len(model.layers)) if use_cache else None


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True
           ) -> tuple[torch.Tensor, DecodeStats]:
    """prompt: [1, T] token ids. Returns the prompt followed by `new_tokens` greedy tokens."""
    model.eval()
    ids, stats, cache = prompt, DecodeStats(), new_cache(model, use_cache)
    pending = prompt  # the positions the model has not seen yet
    for _ in range(new_tokens):
        _, logits = _hidden_and_logits(model, pending if cache is not None else ids, cache)
        stats.main_forwards += 1
        pending = logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, pending], dim=1)
    stats.tokens = new_tokens
    return ids, stats


class MTPDrafter:
    """KV caches of the MTP modules across drafting rounds. Depth k at position i reads depth k-1's state at i and
    token x[i+k]: with L accepted tokens and x[L] (greedy's next token) known, positions i <= L - k depend on
    accepted tokens only and stay cached; the last k - 1 positions read drafts and are recomputed next round."""

    def __init__(self, model: Transformer):
        self.caches = [LayerCache() for _ in model.mtp]
        self.outputs: list[torch.Tensor | None] = [None] * len(model.mtp)  # each depth's cached positions' states


@torch.no_grad()
def draft_with_mtp(model: Transformer, ids: torch.Tensor, hidden: torch.Tensor, first: torch.Tensor,
                   drafter: MTPDrafter | None = None) -> torch.Tensor:
    """Draft tokens t2..t(D+1) after `first` (= t1, the token after `ids`). Depth k at the last position i = L-1
    combines h_(k-1)[i] with the embedding of x[i+k] and predicts x[i+k+1], as in training; each depth's block
    covers all L positions (tokens x[k : L+k]), the sequence extended by the tokens drafted so far, running only the
    positions its cache lacks when a `drafter` is given."""
    length = ids.shape[1]
    x = torch.cat([ids, first], dim=1)
    cos, sin = model.rope(length)
    h, drafts = hidden, []
    for depth, module in enumerate(model.mtp, start=1):
        if drafter is None:
            h = module(h, model.embed(x[:, depth : length + depth]), cos, sin)
        else:
            cache, start = drafter.caches[depth - 1], drafter.caches[depth - 1].length
            new = module(h[:, start:length], model.embed(x[:, start + depth : length + depth]), cos, sin, cache)
            cached = drafter.outputs[depth - 1]
            h = new if cached is None or start == 0 else torch.cat([cached[:, :start], new], dim=1)
            settled = max(0, length - depth + 1)  # positions whose inputs are all accepted tokens
            cache.truncate(settled)
            drafter.outputs[depth - 1] = h[:, :settled]
        token = model.lm_head(module.norm(h[:, -1:])).argmax(-1)
        drafts.append(token)
        x = torch.cat([x, token], dim=1)
    return torch.cat(drafts, dim=1)


@torch.no_grad()
def self_speculative(model: Transformer, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True
                     ) -> tuple[torch.Tensor, DecodeStats]:
    """Exactly `greedy`'s tokens, with one main-model forward per 1 + (accepted drafts) tokens."""
    if not len(model.mtp):
        raise ValueError("self-speculative decoding needs MTP modules (model.mtp_depth > 0)")
    model.eval()
    target = prompt.shape[1] + new_tokens
    ids, stats, cache = prompt, DecodeStats(), new_cache(model, use_cache)
    drafter = MTPDrafter(model) if use_cache else None
    hidden, logits = _hidden_and_logits(model, ids, cache)  # hidden: every position so far (the MTP input)
    stats.main_forwards += 1
    while ids.shape[1] < target:
        first = logits[:, -1:].argmax(-1)  # greedy's next token
        room = target - ids.shape[1] - 1
        if room == 0:
            ids = torch.cat([ids, first], dim=1)
            break
        drafts = draft_with_mtp(model, ids, hidden, first, drafter)[:, :room]
        base = ids.shape[1]  # position of `first`
        candidate = torch.cat([first, drafts], dim=1)
        if cache is not None:  # verifies every draft in one forward over the new positions
            new_hidden, new_logits = _hidden_and_logits(model, candidate, cache)
        else:
            new_hidden, new_logits = (t[:, base:] for t in _hidden_and_logits(model, torch.cat([ids, candidate], 1)))
        stats.main_forwards += 1
        stats.drafted += drafts.shape[1]
        predicted = new_logits[0, : drafts.shape[1]].argmax(-1)  # the main model's token after first, d1, ...
        agree = (predicted == drafts[0]).long().cumprod(0)
        accepted = int(agree.sum())
        stats.accepted += accepted
        kept = 1 + accepted  # causal: the states of this prefix do not depend on the rejected tail
        if cache is not None:
            cache.truncate(base + kept)
        ids = torch.cat([ids, candidate[:, :kept]], dim=1)
        hidden = torch.cat([hidden, new_hidden[:, :kept]], dim=1)
        logits = new_logits[:, kept - 1 : kept]
    stats.tokens = new_tokens
    return ids, stats
