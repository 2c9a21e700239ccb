"""Run under torchrun: for each layout, train a small model with context parallelism (optionally with tensor, data
and expert parallelism) and, in the same process, unsharded on the same global batches; rank 0 writes the
largest differences (loss per step, grads after step 1, grad norm, params after the last step) to the JSON file
named by argv[2]. argv[1] is a JSON list of layouts: {"cp", "tp", "dp", "ep", "sp", "documents", "moe", "mtp",
"mla", "window", "break"}."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from parallel.grid import GridShape, ProcessGrid
from parallel.plan import parallelize
from pretrain.model import ModelConfig, Transformer, lm_loss
from pretrain.model.config import MLAConfig
from pretrain.model.documents import Documents
from pretrain.model.moe import MoEConfig
from tests.parallel.layout_workers import clip_and_step, worker_main

STEPS = 4
GLOBAL_BATCH, SEQ, VOCAB = 4, 32, 96


def model_config(layout: dict) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, aux_loss_weight=0.01, router_z_loss=1e-3,
                    first_k_dense=1) if layout.get("moe") else MoEConfig()
    mla = MLAConfig(q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    return ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ,
                       ffn_hidden=128, tie_embeddings=True, moe=moe, mtp_depth=layout.get("mtp", 0),
                       attention="mla" if layout.get("mla") else "gqa", mla=mla,
                       sliding_window=layout.get("window", 0))


def break_positions(model, cp: int) -> None:
    """Negative control: RoPE at each shard's local positions (0, 1, ...) instead of its true ones."""
    attention_inputs = model.attention_inputs

    def wrong(local_len, documents=None):
        cos, sin = model.rope(local_len * cp)
        _, _, allowed = attention_inputs(local_len, documents)
        return cos[:local_len], sin[:local_len], allowed

    model.attention_inputs = wrong


def run_layout(layout: dict, rank: int, world: int) -> dict:
    shape = GridShape(tp=layout.get("tp", 1), dp=layout.get("dp", 1), cp=layout["cp"], ep=layout.get("ep", 1))
    grid = ProcessGrid.build(shape, world, rank)
    torch.manual_seed(0)
    reference = Transformer(model_config(layout))
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    model = copy.deepcopy(reference)
    plan = parallelize(model, grid, sequence_parallel=layout.get("sp", False))
    if layout.get("break") == "positions":
        break_positions(model, shape.cp)
    if layout.get("break") == "moe_statistics":  # negative control: balance statistics of the local shard only
        for layer in model.moe_layers().values():
            layer.sum_over_sequence, layer.sequence_shards = (lambda x: x), 1
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    per_rank = GLOBAL_BATCH // shape.dp
    rows = slice(grid.coords["dp"] * per_rank, (grid.coords["dp"] + 1) * per_rank)
    result = {"layout": layout, "loss_diff": 0.0, "mtp_diff": 0.0, "losses": []}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
        # packed documents: a new one starts after ~1 position in 6; attention inside each, positions restarted
        document_ids = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.15).long().cumsum(dim=1)
        documents = Documents(document_ids, restart_positions=True) if layout.get("documents") else None
        inputs, labels = batch[:, :-1], batch[:, 1:]
        ref_loss, _ = lm_loss(reference(inputs, labels, documents), labels)
        ref_loss.backward()
        ref_mtp = torch.stack(reference.last_mtp_losses) if reference.mtp else torch.zeros(1)

        local = plan.local_batch({"input_ids": inputs[rows], "labels": labels[rows]})
        local_documents = Documents(document_ids[rows], restart_positions=True) if documents else None
        loss, _ = plan.loss(model(local["input_ids"], local["labels"], local_documents), local["labels"])
        loss.backward()
        plan.sync_grads(model)
        if step == 0:
            grads = plan.full_tensors({n: p.grad for n, p in model.named_parameters()})
            ref_grads = {n: p.grad for n, p in reference.named_parameters()}
            result["grad_diff"] = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
            result["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
        clip_and_step(reference, model, plan, (opt_ref, opt), result)
        mtp = torch.stack(model.last_mtp_losses) if model.mtp else torch.zeros(1)
        mean = torch.cat([loss.detach().reshape(1), mtp.detach()])
        dist.all_reduce(mean, group=grid.group("dp_cp"))
        mean /= grid.size("dp_cp")
        result["losses"].append([ref_loss.item(), mean[0].item()])
        result["loss_diff"] = max(result["loss_diff"], abs(ref_loss.item() - mean[0].item()))
        result["mtp_diff"] = max(result["mtp_diff"], (ref_mtp - mean[1:]).abs().max().item())
    params = plan.full_tensors(dict(model.named_parameters()))
    ref_params = dict(reference.named_parameters())
    result["param_diff"] = max((params[n] - ref_params[n]).abs().max().item() for n in ref_params)
    result["param_moved"] = max((ref_params[n] - initial[n]).abs().max().item() for n in ref_params)
    return result


if __name__ == "__main__":
    worker_main(run_layout)
