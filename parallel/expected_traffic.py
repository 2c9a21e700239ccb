"""What one training step should communicate, per rank, in tensor elements (the quantity `CommVolume` measures
as `elements`), for the layouts we implement. Benchmarks put these next to the measurement, and a test holds
the two equal, so a change that adds a collective shows up.

Megatron's formula (Narayanan et al. 2021, §3.3; Korthikanti et al. 2022 for sequence parallelism): per layer
and micro-batch, tensor parallelism does 2 all-reduces of b·s·h in the forward pass (after the attention and
MLP row-parallel layers) and 2 in the backward pass (at the attention and MLP inputs); sequence parallelism
replaces each all-reduce by an all-gather plus a reduce-scatter of the same b·s·h tensor. On top of the
layers come the vocab-parallel embedding (forward) and LM head input (backward), 3 per-token scalars of the
vocab-parallel cross-entropy, the sequence-parallel norm weights' grads, and one scalar for the grad norm.
The TP group's first rank also broadcasts each micro-batch's token ids and labels to its peers (they read none).
Data parallelism all-reduces every local gradient once per step (plus 2 scalars: mean loss and CE).
Context parallelism (parallel/context.py) all-gathers every layer's keys and values over the whole window in the
forward pass and reduce-scatters their gradients in the backward pass, and sums one token count per loss.
"""

from __future__ import annotations

from pretrain.config import Config


def megatron_layer_elements(cfg: Config, dp: int) -> int:
    """Megatron's per-layer term alone: 4 · L · b · s · h per micro-batch, summed over the step's micro-batches."""
    t = cfg.train
    return 4 * cfg.model.n_layers * t.micro_batch_size * cfg.data.seq_len * cfg.model.d_model * micro_batches(cfg, dp)


def micro_batches(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def tensor_parallel_elements(cfg: Config, dp: int) -> dict[str, int]:
    """Per TP rank and optimizer step, keyed "op@group": the TP group's collectives, and the grad norm's scalar
    summed over the model-parallel group."""
    m, L = micro_batches(cfg, dp), cfg.model.n_layers
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    activation = tokens * cfg.model.d_model
    regions = 2 * L + 1  # attention + MLP per layer, plus embedding (forward) / LM head (backward)
    loss_scalars = 3 * tokens  # max, sum of exponentials, target logit
    grad_norm = {"all_reduce@model": 1}
    data = {"broadcast@tp": m * 2 * tokens}  # the micro-batches' ids and labels, from the TP group's reader
    if cfg.parallel.sequence_parallel:
        norm_weights = (2 * L + 1) * cfg.model.d_model
        return {
            "all_gather@tp": m * 2 * regions * activation,
            "reduce_scatter@tp": m * 2 * regions * activation,
            "all_reduce@tp": m * loss_scalars + norm_weights,
            **grad_norm,
            **data,
        }
    return {"all_reduce@tp": m * (2 * regions * activation + loss_scalars), **grad_norm, **data}


def context_parallel_elements(cfg: Config, dp: int) -> dict[str, int]:
    """Per CP rank and optimizer step (GQA, no tensor parallelism, no MTP), keyed "op@group": per layer and
    micro-batch, K and V of the whole window (2 · b · s · n_kv_heads · head_dim) gathered forward and their
    gradients reduce-scattered backward; one count per loss; gradients and the 2 logged means over DP x CP. Each
    rank sends (cp-1)/cp of the gathered bytes, what a ring exchange of K/V would send too."""
    m, model = micro_batches(cfg, dp), cfg.model
    keys_and_values = 2 * cfg.train.micro_batch_size * cfg.data.seq_len * model.n_kv_heads * model.head_dim
    per_step = m * model.n_layers * keys_and_values
    return {"all_gather@cp": per_step, "reduce_scatter@cp": per_step, "all_reduce@cp": m}


def data_parallel_elements(local_parameters: int, group: str = "dp") -> dict[str, int]:
    """Per DP rank and optimizer step: every local gradient once, plus the mean loss and CE (over `group`: `dp`, or
    `dp_cp` with context parallelism)."""
    return {f"all_reduce@{group}": local_parameters + 2}


def shared_kinds(groups: dict[str, object]) -> dict[str, str]:
    """Each named kind -> the first named kind with the same group object (the grid gives kinds with the same
    members one group, and `CommVolume` labels such a group by its first name)."""
    return {kind: next(k for k, g in groups.items() if g is group) for kind, group in groups.items()}


def as_measured(expected: dict[str, int], shared: dict[str, str]) -> dict[str, int]:
    """`expected` ("op@kind" -> elements) with the kinds that share a group counted under one label."""
    out: dict[str, int] = {}
    for key, elements in expected.items():
        op, kind = key.split("@")
        label = f"{op}@{shared.get(kind, kind)}"
        out[label] = out.get(label, 0) + elements
    return out
