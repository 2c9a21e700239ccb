"""Run under torchrun: for each layout, train the tiny model sharded and, in the same process, unsharded on
the same global batches; rank 0 writes the largest differences (loss per step, grads after step 1, params
after the last step) to the JSON file named by argv[2]. argv[1] is a JSON list of layouts."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from parallel.grid import GridShape, ProcessGrid
from parallel.plan import parallelize
from parallel.tensor.apply import gather_full
from pretrain.model import ModelConfig, Transformer, lm_loss
from pretrain.model.documents import Documents
from tests.parallel.layout_workers import clip_and_step, worker_main

STEPS = 4
GLOBAL_BATCH, SEQ = 8, 16


def model_config(n_kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=32,
                       ffn_hidden=128, tie_embeddings=True)


def full_grads_and_params(model, plan):
    grads, params = {}, {}
    for name, p in model.named_parameters():
        spec = plan.specs[name]
        params[name] = gather_full(p.data, spec, plan.grid.group("tp"))
        if p.grad is not None:
            grads[name] = gather_full(p.grad, spec, plan.grid.group("tp"))
    return grads, params


def run_layout(layout: dict, rank: int, world: int) -> dict:
    shape = GridShape(tp=layout["tp"], dp=layout["dp"])
    grid = ProcessGrid.build(shape, world, rank)
    torch.manual_seed(0)
    reference = Transformer(model_config(layout.get("kv", 2)))
    model = copy.deepcopy(reference)
    plan = parallelize(model, grid, sequence_parallel=layout.get("sp", False))
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dp_rank, dp = grid.coords["dp"], shape.dp
    per_rank = GLOBAL_BATCH // dp
    result = {"layout": layout, "loss_diff": 0.0, "grad_diff": 0.0, "param_diff": 0.0, "losses": []}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        batch = torch.randint(0, 96, (GLOBAL_BATCH, SEQ + 1), generator=g)
        # packed documents: a new one starts after ~1 position in 6; attention inside each, positions restarted
        document_ids = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.15).long().cumsum(dim=1)
        documents = Documents(document_ids, restart_positions=True) if layout.get("documents") else None
        ref_loss, _ = lm_loss(reference(batch[:, :-1], None, documents), batch[:, 1:])
        ref_loss.backward()

        rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        local = batch[rows]
        local_documents = Documents(document_ids[rows], restart_positions=True) if documents else None
        loss, _ = plan.loss(model(local[:, :-1], None, local_documents), local[:, 1:])
        loss.backward()
        if layout.get("break") == "skip_grad_sync":  # negative control: the comparison must notice
            plan.sync_grads = lambda m: None
        plan.sync_grads(model)
        if step == 0:
            grads, _ = full_grads_and_params(model, plan)
            ref_grads = dict(reference.named_parameters())
            result["grad_diff"] = max((grads[n] - ref_grads[n].grad).abs().max().item() for n in grads)
            result["grad_scale"] = max(ref_grads[n].grad.abs().max().item() for n in grads)
        clip_and_step(reference, model, plan, (opt_ref, opt), result)
        mean_loss = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(mean_loss, group=grid.group("dp"))
            mean_loss /= dp
        result["losses"].append([ref_loss.item(), mean_loss.item()])
        result["loss_diff"] = max(result["loss_diff"], abs(ref_loss.item() - mean_loss.item()))
    _, params = full_grads_and_params(model, plan)
    ref_params = dict(reference.named_parameters())
    result["param_diff"] = max((params[n] - ref_params[n]).abs().max().item() for n in params)
    result["param_moved"] = max(
        (ref_params[n] - p0).abs().max().item() for n, p0 in Transformer_init_params(layout).items()
    )
    if shape.tp > 1:
        result["vocab_loss_diff"] = vocab_parallel_loss_diff(plan)
    return result


def vocab_parallel_loss_diff(plan) -> float:
    """Vocab-parallel CE (with label smoothing, z-loss, ignored tokens) against lm_loss on full logits."""
    g = torch.Generator().manual_seed(7)
    full = torch.randn(2, 5, 96, generator=g) * 3
    labels = torch.randint(0, 96, (2, 5), generator=g)
    labels[0, 1] = -100
    worst = 0.0
    for smoothing, z in ((0.0, 0.0), (0.1, 1e-3)):
        ref_logits = full.clone().requires_grad_()
        ref, ref_parts = lm_loss(ref_logits, labels, smoothing, z)
        ref.backward()
        tp, rank = plan.tp, plan.grid.coords["tp"]
        local = full.chunk(tp, dim=-1)[rank].clone().requires_grad_()
        loss, parts = plan.loss(local, labels, smoothing, z)
        loss.backward()
        worst = max(worst, abs(loss.item() - ref.item()), abs(parts["ce"].item() - ref_parts["ce"].item()),
                    (local.grad - ref_logits.grad.chunk(tp, dim=-1)[rank]).abs().max().item())
    return worst


def Transformer_init_params(layout):  # noqa: N802 - the reference's starting point, to show training moved it
    torch.manual_seed(0)
    return dict(Transformer(model_config(layout.get("kv", 2))).named_parameters())


if __name__ == "__main__":
    worker_main(run_layout)
