"""Launching a worker script under torchrun for a list of layouts, and the worker side: run each layout on every
rank, rank 0 writes the results as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parents[2]


def launch(worker: Path, nproc: int, layouts: list, tmp_path: Path, *extra: str) -> list[dict]:
    """Runs `worker` on `nproc` local ranks with the layouts as argv[1], then the `extra` arguments, and last the
    file rank 0 writes the results to."""
    out = tmp_path / f"results_{nproc}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(worker), json.dumps(layouts), *extra, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def worker_main(run_layout: Callable[[dict, int, int], dict]) -> None:
    """In the worker: `run_layout(layout, rank, world)` for each layout of argv[1]; rank 0 writes argv[2]."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = [run_layout(layout, rank, world) for layout in json.loads(sys.argv[1])]
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def clip_and_step(reference, model, plan, optimizers, result: dict) -> None:
    """Clip both models to norm 1 (recording the largest difference of their global grad norms in
    result["norm_diff"]), then step and zero both optimizers (reference's first)."""
    import torch

    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item()
    norm = plan.clip(model, 1.0)
    result["norm_diff"] = max(result.get("norm_diff", 0.0), abs(norm - ref_norm))
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()
