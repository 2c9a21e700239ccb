"""MoE + MTP through the trainer: it learns, logs per-layer load statistics and per-depth MTP losses, the
auxiliary-loss-free biases move and are checkpointed, and a resume reproduces the uninterrupted run exactly."""

import json

import pytest
import torch

from pretrain.callbacks.metrics_log import read_metrics
from tests.pretrain.test_train_e2e import COMMON, StopAfter, run, train_losses

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32", "model.moe.num_shared_experts=1",
       "model.moe.first_k_dense=1", "model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.01",
       "model.moe.aux_loss_weight=0.001", "model.mtp_depth=2", "model.mtp_weight=0.3"]


def test_moe_mtp_training_logs_balances_and_resumes_exactly(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *COMMON, *MOE]
    full = tmp_path / "full"
    summary = run(overrides, full)
    records = [r for r in read_metrics(full / "metrics.jsonl") if r["split"] == "train"]
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.5  # it learns
    assert {"moe/layers.1/imbalance", "moe/layers.1/dropped_share", "moe/layers.1/balance_loss", "mtp/1",
            "mtp/2", "moe/mtp.0/imbalance"} <= set(last)
    # both depths learn (after 12 steps of this tiny model they are too close to rank: which is lower is noise)
    assert all(0 < last[f"mtp/{d}"] < first[f"mtp/{d}"] - 0.3 for d in (1, 2))
    loads = [json.loads(line) for line in (full / "moe_load.jsonl").read_text().splitlines()]
    assert [r["step"] for r in loads] == [r["step"] for r in records]  # one line per logged step
    routed = summary["tokens"] // summary["steps"] * 2  # every token of the step goes to top_k=2 experts
    assert all(len(r["layers.1"]) == 4 and sum(r["layers.1"]) == routed for r in loads)
    assert all(sum(r["mtp.0"]) == routed for r in loads)
    assert summary["val_loss"] is not None

    from pretrain.consolidate import full_tensors

    weights = full_tensors(full / "checkpoints" / "step_00000012")
    # the saved selection biases are exactly the sum of the updates the logged loads call for: each step moves an
    # expert's bias by +0.01 below the mean load, -0.01 above it (the sum can come back to 0: loads flip around)
    moved = False
    biases = {"layers.1": "layers.1.mlp.router.expert_bias", "mtp.0": "mtp.0.block.mlp.router.expert_bias"}
    for layer, name in biases.items():
        updates = [torch.sign(torch.tensor(r[layer]).float().mean() - torch.tensor(r[layer]).float()) for r in loads]
        moved |= any(u.abs().sum() > 0 for u in updates)
        torch.testing.assert_close(weights[name], 0.01 * torch.stack(updates).sum(0), atol=1e-6, rtol=0)
    assert moved

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(overrides, crashed, extra_callbacks=[StopAfter(8)])
    run(overrides, crashed, resume="auto")
    expected, got = train_losses(full), train_losses(crashed)
    for step in range(9, 13):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    assert (crashed / "moe_load.jsonl").read_text() == (full / "moe_load.jsonl").read_text()
