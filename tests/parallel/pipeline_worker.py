"""Run under torchrun: for each layout (argv[1], JSON list of override lists), train the same tiny model with
the real `Trainer` twice in this process — once on the layout, once as a single process — on the same global
data stream, and record the largest differences: loss per step, full gradients at the first optimizer step
(after clipping), full parameters after the last step. Rank 0 writes them to argv[3]; argv[2] is the data."""

from __future__ import annotations

import json
import sys
import tempfile

import torch
import torch.distributed as dist

from parallel.grid import GridShape, ProcessGrid
from pretrain.checkpoint import model_tensors
from pretrain.config import load_config
from pretrain.trainer import Trainer

STEPS = 4
MODEL = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.max_seq_len=32", "data.seq_len=32", "data.num_workers=0", "train.micro_batch_size=2",
         "train.global_batch_size=8", "train.precision=fp32", "tracking.mlflow=false", "optim.lr=1e-2",
         "optim.warmup_steps=0", "train.eval_batches=2"]


def first_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Full (layout-free) gradients as the optimizer sees them in the first step."""
    captured: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        if not captured:
            local = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            captured.update(trainer.plan.full_tensors(local))

    handle = trainer.optimizer.register_step_pre_hook(hook)
    return captured, handle


def run(overrides: list[str], data_dir: str, rank: int, world: int) -> dict:
    flags = [o for o in overrides if o.startswith("+")]
    cfg = load_config(None, [*MODEL, f"data.dir={data_dir}", *(o for o in overrides if o not in flags)])
    p = cfg.parallel
    grid = ProcessGrid.build(GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep), world, rank)
    # what the single process shares with the layout: the model and the data options (e.g. document masking)
    shared = [o for o in overrides if o.startswith(("model.", "data."))]
    if "+break=reference_unmasked" in flags:  # negative control: masking must change the result
        shared = [o for o in shared if not o.startswith("data.")]
    with tempfile.TemporaryDirectory() as tmp:
        reference = Trainer(load_config(None, [*MODEL, f"data.dir={data_dir}", *shared]), f"{tmp}/ref", [])
        trainer = Trainer(cfg, f"{tmp}/par", [], grid)
        if "+break=tied_grad_sync" in flags:  # negative control: the comparison must notice
            trainer.plan.tied_embedding = False
        ref_grads, h1 = first_step_grads(reference)
        grads, h2 = first_step_grads(trainer)
        losses = [(reference.train_step()["loss"], trainer.train_step()["loss"]) for _ in range(STEPS)]
        h1.remove()
        h2.remove()
        val = (reference.evaluate()["val_loss"], trainer.evaluate()["val_loss"])
        params = trainer.plan.full_tensors(model_tensors(trainer.model))
        ref_params = model_tensors(reference.model)
        initial = Trainer(load_config(None, [*MODEL, f"data.dir={data_dir}", *shared]), f"{tmp}/init", []).model
    return {
        "layout": overrides,
        "losses": losses,
        "loss_diff": max(abs(a - b) for a, b in losses),
        "val_diff": abs(val[0] - val[1]),
        "grad_names_match": sorted(grads) == sorted(ref_grads),
        "grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads if n in grads),
        "param_names_match": sorted(params) == sorted(ref_params),
        "param_diff": max((params[n] - ref_params[n]).abs().max().item() for n in ref_params if n in params),
        "param_moved": max((ref_params[n] - t).abs().max().item() for n, t in model_tensors(initial).items()),
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    layouts = json.loads(sys.argv[1])
    results = [run(overrides, sys.argv[2], rank, world) for overrides in layouts]
    if rank == 0:
        with open(sys.argv[3], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
