"""Decoder-only transformer: RMSNorm, GQA attention (or DeepSeek's MLA, `mla.py`) with RoPE, SwiGLU (or MoE).
Plain torch, no parallel code.

Modules are kept separate and named like Hugging Face Llama so that `parallel/` can swap them for sharded
versions (attention reads its head counts from the projection sizes, not the config) and so that export
is a renaming table.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.config import ModelConfig
from pretrain.model.documents import Documents, same_document
from pretrain.model.init import InitRule, initial_value
from pretrain.model.kv_cache import KVCache, LayerCache
from pretrain.model.loss import lm_loss
from pretrain.model.mla import MLA
from pretrain.model.moe import AuxLossInjector, MoE, SwiGLU
from pretrain.model.mtp import MTPModule, mtp_inputs_and_targets
from pretrain.model.recompute import recompute_contexts
from pretrain.model.rope import (
    apply_rope,
    mla_softmax_multiplier,
    rope_attention_factor,
    rope_cos_sin,
    rope_frequencies,
    rope_slice,
)
from pretrain.model.sdpa import causal_attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.core_attention = causal_attention  # softmax(q·kᵀ)·v; context parallelism swaps in its own

    def input_projections(self) -> list[nn.Module]:
        """The linears that read the block input (initialised with the plain std)."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin from position 0 (or per token); with a `cache`, x holds the positions after the cached ones;
        `allowed`: which keys each query may see besides causality (e.g. its own document)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        batch, seq = q.shape[0], q.shape[1]  # seq from the projection: full length even if x is a sequence shard
        start = cache.length if cache is not None else 0
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope_slice(cos, sin, start, seq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0
        out = self.core_attention(q, k, v, self.sliding_window, dropout, allowed=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "mla":
        return MLA(cfg.d_model, cfg.n_heads, cfg.mla, cfg.norm_eps, cfg.sliding_window, cfg.dropout,
                   mla_softmax_multiplier(cfg.rope))
    return Attention(cfg)


class MLP(SwiGLU):
    """The dense feed-forward: SwiGLU of the model's ffn size."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.ffn_dim)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MoE(cfg.d_model, cfg.ffn_dim, cfg.moe) if cfg.moe.is_moe_layer(index) else MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, allowed))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = nn.ModuleList(
            MTPModule(cfg.d_model, cfg.norm_eps, Block(cfg, cfg.n_layers + k)) for k in range(cfg.mtp_depth)
        )
        self.aux_loss_scale = 1.0  # set by the trainer: the factor its main loss gets (1 / micro-batches)
        self.train_mtp = True  # off: the MTP modules do not run in training (kept frozen, e.g. during fine-tuning)
        # Activation recomputation of every block in training: none, full or selective (see recompute.py; set by
        # the trainer from train.activation_checkpointing)
        self.recompute = "none"
        self.last_mtp_losses: list[torch.Tensor] = []
        # (logits, targets) -> (loss, metrics) of the MTP depths; tensor parallelism swaps in the vocab-parallel one
        self.mtp_loss_function = lm_loss
        # labels -> (tokens, targets) of an MTP depth; context parallelism swaps in one that shifts across shards
        self.mtp_shift = mtp_inputs_and_targets
        self.register_buffer("inv_freq", rope_frequencies(cfg.rope, cfg.rope_dim), persistent=False)
        if not self.embed.weight.is_meta:  # on `meta` (sharded initialization) values come later, per shard
            self.reset_parameters()

    def init_rules(self) -> dict[str, InitRule]:
        """Every parameter's initial distribution, by name: Normal(0, init_std); residual-branch outputs scaled by
        1/sqrt(2 * n_layers); norm weights ones. Computed from the module structure, so it also works on `meta`."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        stds: dict[int, float] = {}  # by id(parameter)

        def set_std(value: float, *params: nn.Parameter) -> None:
            stds.update({id(param): value for param in params})

        set_std(std, self.embed.weight, self.lm_head.weight, *(module.proj.weight for module in self.mtp))
        for block in [*self.layers, *(module.block for module in self.mtp)]:
            mlp = block.mlp
            dense = mlp if isinstance(mlp, MLP) else mlp.shared  # the MoE's shared experts are one SwiGLU MLP
            inputs = block.attn.input_projections()  # GQA: q/k/v; MLA: the down- and up-projections
            inputs += [dense.gate_proj, dense.up_proj] if dense is not None else []
            set_std(std, *(linear.weight for linear in inputs))
            set_std(residual_std, block.attn.o_proj.weight)
            if dense is not None:
                set_std(residual_std, dense.down_proj.weight)
            if isinstance(mlp, MoE):
                set_std(std, mlp.router.weight, mlp.experts.gate, mlp.experts.up)
                set_std(residual_std, mlp.experts.down)
        norms = {id(m.weight) for m in self.modules() if isinstance(m, nn.RMSNorm)}
        rules = {}
        for name, param in self.named_parameters():
            if id(param) not in stds and id(param) not in norms:
                raise ValueError(f"parameter {name} has no initialization rule")
            rules[name] = InitRule(tuple(param.shape), stds.get(id(param)))
        return rules

    def reset_parameters(self, seed: int | None = None) -> None:
        """Every parameter from its own name and `seed` (default: torch's current seed), independent of creation
        order and of how the model is later cut: `parallel/` initializes a shard with the same values."""
        seed = torch.initial_seed() if seed is None else seed
        with torch.no_grad():
            for name, rule in self.init_rules().items():
                param = self.get_parameter(name)
                param.copy_(initial_value(name, rule, seed, param.dtype))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """The buffers that are not learned (RoPE frequencies, MoE balancing state), e.g. after materializing a
        model built on the `meta` device."""
        self.inv_freq = rope_frequencies(self.cfg.rope, self.cfg.rope_dim).to(self.inv_freq.device)
        for layer in self.moe_layers().values():
            layer.reset_buffers()

    def moe_layers(self) -> dict[str, MoE]:
        """The MoE feed-forwards this model holds, by name ('layers.3', 'mtp.0')."""
        blocks = {f"layers.{i}": b for i, b in enumerate(self.layers)}
        blocks |= {f"mtp.{k}": m.block for k, m in enumerate(self.mtp)}
        return {name: b.mlp for name, b in blocks.items() if isinstance(getattr(b, "mlp", None), MoE)}

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..seq_len-1 (dynamic NTK scaling recomputes the frequencies beyond the
        original length)."""
        rope = self.cfg.rope
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # a module-wide cast (e.g. to bf16) must not reach the frequencies
            self.inv_freq = inv_freq = rope_frequencies(rope, self.cfg.rope_dim).to(inv_freq.device)
        if rope.scaling == "dynamic" and seq_len > rope.original_max_seq_len:
            inv_freq = rope_frequencies(rope, self.cfg.rope_dim, seq_len).to(inv_freq.device)
        return rope_cos_sin(inv_freq, seq_len, attention_factor=rope_attention_factor(rope))

    def attention_inputs(self, seq_len: int, documents: Documents | None = None):
        """(cos, sin, allowed) for a window of `seq_len`: with `documents`, attention stays inside each document
        and, if its positions are given, RoPE counts from each document's start."""
        cos, sin = self.rope(seq_len)
        if documents is None:
            return cos, sin, None
        if documents.positions is not None:
            cos, sin = cos[documents.positions], sin[documents.positions]
        return cos, sin, same_document(documents.ids)

    def forward_layers(self, h: torch.Tensor, layers, seq_len: int, cache: KVCache | None = None,
                       documents: Documents | None = None, inputs: tuple | None = None) -> torch.Tensor:
        """Runs a slice of the blocks (a pipeline stage runs its own slice). With a `cache` (inference over the whole
        model), h holds the `seq_len` positions after the cached ones. `inputs`: `attention_inputs` already built."""
        if cache is not None:
            cos, sin = self.rope(cache.length + seq_len)
            for block, layer_cache in zip(layers, cache.layers, strict=True):
                h = block(h, cos, sin, layer_cache)
            return h
        cos, sin, allowed = inputs if inputs is not None else self.attention_inputs(seq_len, documents)
        recompute = self.recompute != "none" and self.training and torch.is_grad_enabled()
        for block in layers:
            if recompute:
                contexts = functools.partial(recompute_contexts, block, self.recompute)
                h = checkpoint(block, h, cos, sin, None, allowed, use_reentrant=False, context_fn=contexts)
            else:
                h = block(h, cos, sin, None, allowed)
        return h

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                documents: Documents | None = None) -> torch.Tensor:
        """Logits of the main model. In training with `labels`, the MTP modules also run and their loss joins
        the gradient of the returned logits (per-depth values in `last_mtp_losses`). `documents`: the packed
        documents of each window, for attention masking (and per-document positions)."""
        h = self.embed(input_ids)
        inputs = self.attention_inputs(input_ids.shape[1], documents)  # one mask for the blocks and the MTP modules
        h = self.forward_layers(h, self.layers, input_ids.shape[1], inputs=inputs)
        logits = self.lm_head(self.norm(h))
        if len(self.mtp) and self.train_mtp and labels is not None and self.training and torch.is_grad_enabled():
            logits = AuxLossInjector.apply(logits, self.mtp_loss(h, labels, documents, inputs), self.aux_loss_scale)
        return logits

    def mtp_loss(self, hidden: torch.Tensor, labels: torch.Tensor, documents: Documents | None = None,
                 inputs: tuple | None = None) -> torch.Tensor:
        """mtp_weight x the mean over depths of each depth's cross-entropy."""
        cos, sin, allowed = inputs if inputs is not None else self.attention_inputs(labels.shape[1], documents)
        losses = []
        for depth, module in enumerate(self.mtp, start=1):
            tokens, targets = self.mtp_shift(labels, depth)
            hidden = module(hidden, self.embed(tokens), cos, sin, allowed=allowed)
            losses.append(self.mtp_loss_function(self.lm_head(module.norm(hidden)), targets)[0])
        self.last_mtp_losses = [loss.detach() for loss in losses]
        return self.cfg.mtp_weight * torch.stack(losses).mean()
