"""Which layers go to which pipeline stage.

Stages are contiguous runs of layers. Balanced splitting minimizes the most expensive stage, with costs in
training FLOPs per token: each block's matmuls and attention (an MoE block: the experts a token uses, so dense
and MoE blocks differ), plus the embedding on the first stage and the LM head with its loss on the last (the
head of a small-vocabulary model is cheap, of a 128k-vocabulary model it is worth several layers). With virtual
stages (interleaved schedule) stage s lives on pipeline rank s % pp.
"""

from __future__ import annotations

from functools import cache

from pretrain.model.config import ModelConfig
from pretrain.model.flops import attention_matmul_parameters, attention_score_flops, mlp_parameters


def layer_cost(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Training FLOPs per token of block `layer`: its attention's projections (GQA or MLA) and QK^T/AV over the
    full sequence, and its feed-forward's matmuls (an MoE layer: the router and the experts a token uses), times 3
    for the backward."""
    matmuls = attention_matmul_parameters(cfg) + mlp_parameters(cfg, layer, active=True)
    return float(6 * matmuls + 3 * attention_score_flops(cfg, seq_len))


def stage_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """(cost of each block, embedding extra, head + loss (+ MTP modules) extra) in training FLOPs per token."""
    d = cfg.d_model
    blocks = [layer_cost(cfg, i, seq_len) for i in range(cfg.n_layers)]
    embedding = 6 * d  # a gather forward, a scatter-add backward: cheap, but counted
    head = 6 * d * cfg.vocab_size + 10 * cfg.vocab_size  # projection, plus softmax/cross-entropy
    # MTP modules (last stage): their block, projection and the shared head
    mtp = sum(layer_cost(cfg, cfg.n_layers + k, seq_len) + 6 * 2 * d * d + head for k in range(cfg.mtp_depth))
    return blocks, float(embedding), float(head + mtp)


def balanced_layer_counts(n_layers: int, stages: int, block: float | list[float], first_extra: float,
                          last_extra: float) -> list[int]:
    """Contiguous split (each stage >= 1 layer) minimizing the largest stage cost; `block` is every layer's cost or
    a list of each layer's (dense and MoE layers differ). Ties favour earlier stages getting fewer layers, as they
    hold more activations under 1F1B."""
    costs = list(block) if isinstance(block, list) else [block] * n_layers
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @cache
    def best(start_stage: int, layers_left: int) -> tuple[float, tuple[int, ...]]:
        remaining = stages - start_stage
        first = n_layers - layers_left
        if remaining == 1:
            cost = prefix[n_layers] - prefix[first] + last_extra + (first_extra if start_stage == 0 else 0)
            return cost, (layers_left,)
        options = []
        for k in range(1, layers_left - remaining + 2):
            cost = prefix[first + k] - prefix[first] + (first_extra if start_stage == 0 else 0)
            rest_cost, rest = best(start_stage + 1, layers_left - k)
            options.append((max(cost, rest_cost), (k, *rest)))
        return min(options)

    if stages > n_layers:
        raise ValueError(f"{stages} stages cannot each get a layer of {n_layers}")
    return list(best(0, n_layers)[1])


def layer_ranges(counts: list[int]) -> list[range]:
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def plan_stages(
    cfg: ModelConfig, seq_len: int, pp: int, virtual: int, explicit: list[int] | None = None
) -> list[range]:
    """Layer ranges of all pp * virtual stages, in stage order."""
    stages = pp * virtual
    if explicit:
        return layer_ranges(list(explicit))
    if virtual > 1:
        return layer_ranges([cfg.n_layers // stages] * stages)
    block, embedding, head = stage_costs(cfg, seq_len)
    return layer_ranges(balanced_layer_counts(cfg.n_layers, stages, block, embedding, head))


def stages_of_rank(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + chunk * pp for chunk in range(virtual)]
