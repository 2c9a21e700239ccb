"""Greedy decoding, and self-speculative decoding with the model's own MTP modules (no KV cache yet: every
forward runs the whole sequence, which keeps both decoders simple and exactly comparable).

Self-speculative decoding: one forward of the main model gives the next token t1 and the last hidden state;
the MTP modules then draft t2..t(D+1) (depth k embeds the token the previous depth produced), and one more
forward of the main model over the sequence plus t1 and the drafts verifies them: drafts are kept while they
equal the main model's own greedy choice, and the first disagreement is replaced by that choice. The output is
exactly greedy decoding's; what changes is how many main-model forwards it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _hidden_and_logits(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.forward_layers(model.embed(ids), model.layers, ids.shape[1])
    return h, model.lm_head(model.norm(h))


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, DecodeStats]:
    """prompt: [1, T] token ids. Returns the prompt followed by `new_tokens` greedy tokens."""
    model.eval()
    ids, stats = prompt, DecodeStats()
    for _ in range(new_tokens):
        _, logits = _hidden_and_logits(model, ids)
        stats.main_forwards += 1
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    stats.tokens = new_tokens
    return ids, stats


@torch.no_grad()
def draft_with_mtp(model: Transformer, ids: torch.Tensor, hidden: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Draft tokens t2..t(D+1) after `first` (= t1, the token after `ids`). Depth k at the last position i = L-1
    combines h_(k-1)[i] with the embedding of x[i+k] and predicts x[i+k+1], as in training; each depth runs its
    block over all L positions (tokens x[k : L+k]), the sequence extended by the tokens drafted so far."""
    length = ids.shape[1]
    x = torch.cat([ids, first], dim=1)
    cos, sin = model.rope(length)
    h, drafts = hidden, []
    for depth, module in enumerate(model.mtp, start=1):
        h = module(h, model.embed(x[:, depth : length + depth]), cos, sin)
        token = model.lm_head(module.norm(h[:, -1:])).argmax(-1)
        drafts.append(token)
        x = torch.cat([x, token], dim=1)
    return torch.cat(drafts, dim=1)


@torch.no_grad()
def self_speculative(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, DecodeStats]:
    """Exactly `greedy`'s tokens, with one main-model forward per 1 + (accepted drafts) tokens."""
    if not len(model.mtp):
        raise ValueError("self-speculative decoding needs MTP modules (model.mtp_depth > 0)")
    model.eval()
    target = prompt.shape[1] + new_tokens
    ids, stats = prompt, DecodeStats()
    hidden, logits = _hidden_and_logits(model, ids)
    stats.main_forwards += 1
    while ids.shape[1] < target:
        first = logits[:, -1:].argmax(-1)  # greedy's next token
        room = target - ids.shape[1] - 1
        drafts = draft_with_mtp(model, ids, hidden, first)[:, :room] if room > 0 else first[:, :0]
        base = ids.shape[1]  # position of `first` in the candidate
        candidate = torch.cat([ids, first, drafts], dim=1)
        if drafts.shape[1] == 0:
            ids = candidate
            if ids.shape[1] < target:
                hidden, logits = _hidden_and_logits(model, ids)
                stats.main_forwards += 1
            continue
        hidden, logits = _hidden_and_logits(model, candidate)  # verifies every draft in one forward
        stats.main_forwards += 1
        stats.drafted += drafts.shape[1]
        predicted = logits[0, base : base + drafts.shape[1]].argmax(-1)  # the main model's token after each
        agree = (predicted == drafts[0]).long().cumprod(0)
        accepted = int(agree.sum())
        stats.accepted += accepted
        keep = base + 1 + accepted  # causal: the states of this prefix do not depend on the rejected tail
        ids, hidden, logits = candidate[:, :keep], hidden[:, :keep], logits[:, :keep]
    stats.tokens = new_tokens
    return ids, stats
