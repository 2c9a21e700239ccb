"""Run under torchrun with 2 ranks: feed the same weights and inputs to our tensor-parallel layers and to
`megatron.core.tensor_parallel`, and write the largest output/gradient differences to the JSON file named by
argv[1] (rank 0).

Layout: Megatron's activations are [seq, batch, hidden] and sequence parallelism shards dim 0; ours are
[batch, seq, hidden] and shard dim 1. Inputs are transposed on the way in and out, nothing else is adapted.
Megatron allocates its sequence-parallel buffers on `torch.cuda.current_device()`; on a CPU-only machine that
call is pointed at the CPU for this process (the only change made to megatron-core).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    torch.cuda.current_device = lambda: "cpu"

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from megatron.core import ModelParallelConfig, parallel_state  # noqa: E402
from megatron.core import tensor_parallel as mtp  # noqa: E402

from parallel.tensor import comm  # noqa: E402
from parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding  # noqa: E402
from parallel.tensor.loss import vocab_parallel_lm_loss  # noqa: E402

BATCH, SEQ, HIDDEN, FFN, VOCAB = 3, 8, 16, 24, 40


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def megatron_config(sequence_parallel: bool) -> ModelParallelConfig:
    return ModelParallelConfig(tensor_model_parallel_size=dist.get_world_size(), sequence_parallel=sequence_parallel,
                               use_cpu_initialization=True, params_dtype=torch.float32)


def seq_shard(x_bsh: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x_bsh.chunk(world, dim=1)[rank]


def mlp_pair(sequence_parallel: bool, group, rank: int, world: int) -> dict:
    """x -> column-parallel (no gather) -> gelu -> row-parallel, forward and backward."""
    torch.manual_seed(1)
    w_in, w_out = torch.randn(FFN, HIDDEN), torch.randn(HIDDEN, FFN)
    x_full = torch.randn(BATCH, SEQ, HIDDEN)
    grad_out_full = torch.randn(BATCH, SEQ, HIDDEN)

    cfg = megatron_config(sequence_parallel)
    m_col = mtp.ColumnParallelLinear(HIDDEN, FFN, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                     gather_output=False)
    m_row = mtp.RowParallelLinear(FFN, HIDDEN, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                  input_is_parallel=True, skip_bias_add=False)
    ours_col = ColumnParallelLinear.from_linear(_linear(w_in), group, sequence_parallel)
    ours_row = RowParallelLinear.from_linear(_linear(w_out), group, sequence_parallel)
    with torch.no_grad():
        m_col.weight.copy_(ours_col.weight)
        m_row.weight.copy_(ours_row.weight)

    x_ours = (seq_shard(x_full, rank, world) if sequence_parallel else x_full).clone().requires_grad_()
    x_meg = x_ours.detach().transpose(0, 1).clone().requires_grad_()
    g_ours = seq_shard(grad_out_full, rank, world) if sequence_parallel else grad_out_full

    y_ours = ours_row(torch.nn.functional.gelu(ours_col(x_ours)))
    y_ours.backward(g_ours)
    hidden_meg, _ = m_col(x_meg)
    y_meg, _ = m_row(torch.nn.functional.gelu(hidden_meg))
    y_meg.backward(g_ours.transpose(0, 1))

    tag = "sp" if sequence_parallel else "tp"
    result = {
        f"mlp_{tag}/output": max_diff(y_ours, y_meg.transpose(0, 1)),
        f"mlp_{tag}/input_grad": max_diff(x_ours.grad, x_meg.grad.transpose(0, 1)),
        f"mlp_{tag}/column_weight_grad": max_diff(ours_col.weight.grad, m_col.weight.grad),
        f"mlp_{tag}/row_weight_grad": max_diff(ours_row.weight.grad, m_row.weight.grad),
        f"mlp_{tag}/output_scale": y_meg.abs().max().item(),
        f"mlp_{tag}/weight_grad_scale": min(m_col.weight.grad.abs().max().item(), m_row.weight.grad.abs().max().item()),
    }
    if not sequence_parallel:
        # Negative control: skip the region entry, so the backward all-reduce of the input grad is missing.
        broken = ColumnParallelLinear(ours_col.weight.detach().clone(), group, enters_region=False)
        x_broken = x_full.clone().requires_grad_()
        ours_row.weight.grad = None
        ours_row(torch.nn.functional.gelu(broken(x_broken))).backward(g_ours)
        result["control/missing_input_grad_all_reduce"] = max_diff(x_broken.grad, x_meg.grad.transpose(0, 1))
    return result


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def embedding(sequence_parallel: bool, group, rank: int, world: int) -> dict:
    torch.manual_seed(2)
    table = torch.randn(VOCAB, HIDDEN)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    grad_full = torch.randn(BATCH, SEQ, HIDDEN)

    m_emb = mtp.VocabParallelEmbedding(VOCAB, HIDDEN, init_method=torch.nn.init.zeros_,
                                       reduce_scatter_embeddings=sequence_parallel,
                                       config=megatron_config(sequence_parallel))
    full = torch.nn.Embedding(VOCAB, HIDDEN)
    with torch.no_grad():
        full.weight.copy_(table)
    ours = VocabParallelEmbedding.from_embedding(full, group, sequence_parallel)
    with torch.no_grad():
        m_emb.weight.copy_(ours.weight)

    grad = seq_shard(grad_full, rank, world) if sequence_parallel else grad_full
    y_ours = ours(ids)
    y_ours.backward(grad)
    y_meg = m_emb(ids)
    y_meg.backward(grad.transpose(0, 1) if sequence_parallel else grad)
    if sequence_parallel:  # Megatron's reduce-scattered embedding output is [s/tp, b, h]
        y_meg = y_meg.transpose(0, 1)
    tag = "sp" if sequence_parallel else "tp"
    return {
        f"embedding_{tag}/vocab_range_mismatch": float(ours.vocab_start != m_emb.vocab_start_index),
        f"embedding_{tag}/output": max_diff(y_ours, y_meg),
        f"embedding_{tag}/weight_grad": max_diff(ours.weight.grad, m_emb.weight.grad),
    }


def cross_entropy(group, rank: int, world: int) -> dict:
    """Without label smoothing only: Megatron's vocab-parallel label smoothing uses the local partition's size
    and mean log-probability, so its loss differs between TP ranks (NVIDIA/Megatron-LM#737, #7464). Ours uses
    the global vocabulary and is checked against the one-process loss in tests/parallel/test_tensor_parallel.py."""
    torch.manual_seed(3)
    logits_full = torch.randn(BATCH, SEQ, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    local = logits_full.chunk(world, dim=-1)[rank]
    vocab_start = rank * local.shape[-1]

    ours_logits = local.clone().requires_grad_()
    loss_ours, _ = vocab_parallel_lm_loss(ours_logits, labels, group, vocab_start, VOCAB)
    loss_ours.backward()

    meg_logits = local.transpose(0, 1).contiguous().requires_grad_()
    loss_meg = mtp.vocab_parallel_cross_entropy(meg_logits, labels.t().contiguous()).mean()
    loss_meg.backward()

    # Negative control: each rank's local cross-entropy, as if the vocabulary were not split.
    local_only = torch.nn.functional.cross_entropy(
        local.reshape(-1, local.shape[-1]), (labels - vocab_start).clamp(0, local.shape[-1] - 1).reshape(-1))
    return {
        "cross_entropy/loss": max_diff(loss_ours, loss_meg),
        "cross_entropy/logits_grad": max_diff(ours_logits.grad, meg_logits.grad.transpose(0, 1)),
        "cross_entropy/loss_value": loss_meg.item(),
        "control/local_softmax_loss": max_diff(local_only, loss_meg),
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    assert dist.get_world_size(group) == world

    results: dict[str, float] = {}
    for sequence_parallel in (False, True):
        results |= mlp_pair(sequence_parallel, group, rank, world)
        results |= embedding(sequence_parallel, group, rank, world)
    results |= cross_entropy(group, rank, world)
    # the sequence-parallel communication helpers agree too
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(4))
    results["gather_sequence"] = max_diff(
        comm.gather_sequence(x.transpose(0, 1).chunk(world, dim=1)[rank].contiguous(), group),
        mtp.gather_from_sequence_parallel_region(x.chunk(world, dim=0)[rank].contiguous()).transpose(0, 1))

    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {k: max(r[k] for r in gathered) for k in results}
        with open(sys.argv[1], "w") as f:
            json.dump(merged, f, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
