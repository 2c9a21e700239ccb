"""Decoding for many prompts at once: greedy or sampled (temperature, top-k, top-p) generation of a left-padded
batch over a KV cache, and beam search for one prompt. Plain torch, no CLI (`pretrain/generate_cli.py` is that).

Left padding. Prompts of different lengths are laid out right-aligned in one [rows, columns] batch, so every row's
next token is the last column. Each row's positions count from its first real token (RoPE sees exactly the positions
the prompt would have alone), and no query attends to a padding key. The blocks' attention takes a mask only without
a cache (`causal_attention` crops `allowed` to [queries, queries]), so generation swaps in, for its duration, a core
attention that reads `allowed` as the whole mask over the cached keys ([rows, 1, queries, keys]: causality, sliding
window and padding in one) — `core_attention` is the attribute that is meant to be swapped (context parallelism
swaps it too). A padding query may see its own key only: a query that sees nothing would give NaN, which would then
reach the real rows through the values. A row that stops leaves the batch (its cache rows are dropped), and columns
that are padding in every remaining row are dropped with it. With dropless MoE (or none) and fp32, a prompt gets the
tokens it gets alone; an MoE with a capacity factor routes padding tokens too, so batch-mates can change its tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.model.kv_cache import KVCache
from pretrain.model.sdpa import repeat_kv_heads
from pretrain.model.transformer import Transformer


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen: the most likely one (`greedy`, or temperature 0), else sampled from the
    temperature-scaled distribution restricted to the `top_k` most likely tokens and then to the smallest set whose
    probability reaches `top_p`. Prompt i of a call samples from its own generator, seeded `seed + i` (None: a fresh
    random seed)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


GREEDY = SamplingOptions(greedy=True)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [..., vocab] with every token outside the top-k, then outside the nucleus of probability `top_p`, set
    to -inf. The nucleus is the most likely tokens while the mass before them is below `top_p`, so it always holds
    the most likely token and the one that crosses `top_p`."""
    if top_k is not None and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        outside[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, options: SamplingOptions, generators: list[torch.Generator]
                  ) -> torch.Tensor:
    """One token per row of logits [rows, vocab]; row r samples with generators[r]."""
    if options.is_greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / options.temperature, options.top_k, options.top_p).softmax(dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])


def _generators(options: SamplingOptions, count: int, device: torch.device) -> list[torch.Generator]:
    if options.is_greedy:
        return []
    base = options.seed if options.seed is not None else torch.Generator().seed() % 2**62
    return [torch.Generator(device=device).manual_seed(base + i) for i in range(count)]


def _attention_over_cached_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int = 0,
                                dropout: float = 0.0, scale: float | None = None,
                                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """`allowed` [rows, 1, queries, keys] is the whole mask (causality and the window are already in it)."""
    k, v = repeat_kv_heads(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale)


@contextlib.contextmanager
def _masks_over_cached_keys(model: Transformer) -> Iterator[None]:
    attentions = [block.attn for block in model.layers]
    saved = [attention.core_attention for attention in attentions]
    for attention in attentions:
        attention.core_attention = _attention_over_cached_keys
    try:
        yield
    finally:
        for attention, core in zip(attentions, saved, strict=True):
            attention.core_attention = core


def _rope_by_position(model: Transformer, positions: torch.Tensor, lengths: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin [rows, columns, dim] for `positions` [rows, columns]; row r is `lengths[r]` tokens long
    (dynamic NTK scaling picks its frequencies by the current length, as a lone prompt's decoding would)."""
    if model.cfg.rope.scaling != "dynamic":
        cos, sin = model.rope(int(lengths.max()))
        return cos[positions], sin[positions]
    tables = {n: model.rope(n) for n in set(lengths.tolist())}
    rows = [(tables[n][0][p], tables[n][1][p]) for n, p in zip(lengths.tolist(), positions, strict=True)]
    return torch.stack([cos for cos, _ in rows]), torch.stack([sin for _, sin in rows])


def _padded_forward(model: Transformer, ids: torch.Tensor, cache: KVCache, pads: torch.Tensor) -> torch.Tensor:
    """Logits [rows, vocab] after the last column, running the columns of `ids` [rows, new] after the cached ones;
    row r's first `pads[r]` columns are padding."""
    start, total = cache.length, cache.length + ids.shape[1]
    columns = torch.arange(total, device=ids.device)
    queries = columns[start:].unsqueeze(1)
    allowed = columns <= queries
    if model.cfg.sliding_window > 0:
        allowed &= queries - columns < model.cfg.sliding_window
    real = columns >= pads.unsqueeze(1)  # [rows, columns]
    allowed = allowed & (real.unsqueeze(1) | (columns == queries))  # [rows, queries, columns]
    cos, sin = _rope_by_position(model, (columns - pads.unsqueeze(1)).clamp(min=0), total - pads)
    h = model.embed(ids)
    for block, layer_cache in zip(model.layers, cache.layers, strict=True):
        h = block(h, cos, sin, layer_cache, allowed.unsqueeze(1))
    return model.lm_head(model.norm(h[:, -1]))


def _keep_rows(cache: KVCache, rows: torch.Tensor, drop_columns: int = 0) -> None:
    """Keeps the cache rows `rows` (in that order), without their first `drop_columns` columns."""
    for layer in cache.layers:
        if layer.keys is not None and layer.values is not None:
            layer.keys = layer.keys[rows, :, drop_columns:]
            layer.values = layer.values[rows, :, drop_columns:]


def _append_or_stop(tokens: list[int], token: int, stop_ids: set[int], stop_sequences: list[list[int]]) -> bool:
    """Adds `token` to a sequence's new tokens; True when the sequence ends (the stop id or sequence removed)."""
    if token in stop_ids:
        return True
    tokens.append(token)
    for stop in stop_sequences:
        if stop and tokens[-len(stop):] == stop:
            del tokens[-len(stop):]
            return True
    return False


def cut_at_stops(tokens: list[int], stop_ids: set[int], stop_sequences: list[list[int]] | None = None
                 ) -> list[int]:
    """`tokens` up to where `generate_batch` would have stopped (for decoders that do not stop by themselves)."""
    kept: list[int] = []
    for token in tokens:
        if _append_or_stop(kept, token, stop_ids, stop_sequences or []):
            break
    return kept


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                   options: SamplingOptions = GREEDY, stop_ids: set[int] | None = None,
                   stop_sequences: list[list[int]] | None = None, pad_id: int = 0) -> list[list[int]]:
    """Each prompt's new tokens (at most `max_new_tokens`), decoded together over one KV cache (see the module
    docstring for the masking). A sequence ends at a stop id or when its tokens end with a stop sequence; neither
    is returned. `pad_id` only fills the padding columns, which nothing attends to."""
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    stop_ids, stop_sequences = stop_ids or set(), stop_sequences or []
    width = max((len(prompt) for prompt in prompts), default=0)
    pads = torch.tensor([width - len(prompt) for prompt in prompts], device=device)
    ids = torch.tensor([[pad_id] * (width - len(prompt)) + prompt for prompt in prompts], device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompt each row of the batch decodes
    generators = _generators(options, len(prompts), device)
    cache = KVCache(len(model.layers))
    with _masks_over_cached_keys(model):
        for _ in range(max_new_tokens if prompts else 0):
            logits = _padded_forward(model, ids, cache, pads)
            tokens = choose_tokens(logits, options, [generators[r] for r in rows] if generators else []).tolist()
            going = [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True))
                     if not _append_or_stop(outputs[row], token, stop_ids, stop_sequences)]
            if not going:
                break
            if len(going) < len(rows):
                kept = torch.tensor(going, device=device)
                pads = pads[kept]
                shift = int(pads.min())  # columns that are padding in every remaining row
                _keep_rows(cache, kept, shift)
                pads = pads - shift
                rows = [rows[i] for i in going]
            ids = torch.tensor([[tokens[i]] for i in going], device=device)
    return outputs


def _logits(model: Transformer, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    h = model.forward_layers(model.embed(ids), model.layers, ids.shape[1], cache)
    return model.lm_head(model.norm(h[:, -1]))


@dataclass
class _Hypothesis:
    log_prob: float  # the sum over its tokens
    tokens: list[int]

    def score(self, length_penalty: float) -> float:
        return self.log_prob / max(len(self.tokens), 1) ** length_penalty


@torch.no_grad()
def beam_search(model: Transformer, prompt: list[int], max_new_tokens: int, beams: int = 4,
                length_penalty: float = 1.0, stop_ids: set[int] | None = None) -> list[int]:
    """The new tokens of the best hypothesis of a beam search over log-probabilities (Hugging Face's convention):
    each step extends the live beams by their best 2·beams continuations; one that ends with a stop id within the top
    `beams` is finished and scored sum_logprob / len**length_penalty (len counting the new tokens, the stop id
    included, which is not returned), the best `beams` others stay live. The search ends when `beams` hypotheses
    are finished and the best live one, scored at its current length, cannot beat the worst of them, or after
    `max_new_tokens`, when the live beams join the finished ones. One beam is greedy decoding."""
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    model.eval()
    stop_ids = stop_ids or set()
    device = next(model.parameters()).device
    cache = KVCache(len(model.layers))
    ids = torch.tensor([prompt], device=device)
    live: list[_Hypothesis] = [_Hypothesis(0.0, [])]
    finished: list[_Hypothesis] = []
    for step in range(1, max_new_tokens + 1):
        log_probs = F.log_softmax(_logits(model, ids, cache).float(), dim=-1)
        totals = log_probs + torch.tensor([h.log_prob for h in live], device=device).unsqueeze(1)
        best = totals.flatten().topk(min(2 * beams, totals.numel()))
        next_live, origins = [], []
        for rank, (total, index) in enumerate(zip(best.values.tolist(), best.indices.tolist(), strict=True)):
            origin, token = divmod(index, log_probs.shape[1])
            hypothesis = _Hypothesis(total, [*live[origin].tokens, token])
            if token in stop_ids:
                if rank < beams:
                    finished.append(hypothesis)
                continue
            next_live.append(hypothesis)
            origins.append(origin)
            if len(next_live) == beams:
                break
        finished = sorted(finished, key=lambda h: h.score(length_penalty), reverse=True)[:beams]
        live = next_live
        if not live:
            break
        if len(finished) == beams and finished[-1].score(length_penalty) >= live[0].log_prob / step**length_penalty:
            live = []
            break
        _keep_rows(cache, torch.tensor(origins, device=device))
        ids = torch.tensor([[h.tokens[-1]] for h in live], device=device)
    candidates = [*finished, *live]
    if not candidates:
        return []
    winner = max(candidates, key=lambda h: h.score(length_penalty))
    return winner.tokens[:-1] if winner.tokens and winner.tokens[-1] in stop_ids else winner.tokens
