"""DPO in the trainer: the loss starts at ln 2 (policy = reference), the reference stays the starting weights across
a resume, and accumulation gives the gradient of one batch averaged over its pairs."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ConfigError, load_config

from .conftest import DPO
from .test_sft import first_step_gradients
from .test_train_e2e import StopAfter, run, train_losses


def dpo_overrides(tiny_overrides, tiny_pairs, base_run, *more):
    return [*tiny_overrides, *DPO, f"data.dir={tiny_pairs}", f"train.init_from={base_run['checkpoint']}",
            "tracking.mlflow=false", "tracking.progress_bar=false", *more]


def test_the_first_step_scores_policy_and_reference_alike(tiny_overrides, tiny_pairs, base_run, tmp_path):
    overrides = dpo_overrides(tiny_overrides, tiny_pairs, base_run, "optim.grad_clip=0", "train.global_batch_size=4")
    accumulated, metrics, trainer = first_step_gradients([*overrides, "train.micro_batch_size=1"], tmp_path / "a")
    one_batch, one_metrics, _ = first_step_gradients([*overrides, "train.micro_batch_size=4"], tmp_path / "b")
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0): the reference is the policy
    assert metrics["dpo/reward_margin"] == 0 and metrics["dpo/reward_accuracy"] == 0
    assert metrics["pairs"] == one_metrics["pairs"] >= 4
    scale = max(g.abs().max().item() for g in one_batch.values())
    assert scale > 0
    for name, grad in one_batch.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-5 * scale, rtol=0, msg=name)
    frozen = trainer.objective.reference.weights  # a copy of the starting weights, untouched by the step
    assert all(not t.requires_grad for t in frozen.values())
    policy = trainer.model.get_parameter("layers.0.attn.q_proj.weight")
    assert frozen["layers.0.attn.q_proj.weight"].data_ptr() != policy.data_ptr()
    assert not torch.equal(frozen["layers.0.attn.q_proj.weight"], policy.detach())


def test_a_resume_keeps_the_starting_weights_as_the_reference(tiny_overrides, tiny_pairs,
                                                                                  base_run, tmp_path):
    overrides = dpo_overrides(tiny_overrides, tiny_pairs, base_run, "train.steps=4", "train.log_every=1",
                              "train.eval_every=4", "train.eval_batches=2", "train.checkpoint_every=2",
                              "optim.lr=3e-3", "optim.warmup_steps=1")
    full = run(overrides, tmp_path / "full")
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(overrides, crashed, extra_callbacks=[StopAfter(2)])
    resumed = run(overrides, crashed, resume="auto")
    # were the reference the resumed weights, steps 3 and 4 would start from ln 2 again
    assert train_losses(crashed) == train_losses(tmp_path / "full")
    assert resumed["pairs"] == full["pairs"]
    losses = train_losses(tmp_path / "full")
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6) and abs(losses[4] - math.log(2)) > 1e-3
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)


def test_dpo_layouts_it_cannot_run_yet_are_config_errors(tiny_overrides, tiny_pairs, base_run):
    base = dpo_overrides(tiny_overrides, tiny_pairs, base_run)
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, [*base, "train.init_from="])
    with pytest.raises(ConfigError, match="parallel.cp"):
        load_config(None, [*base, "parallel.cp=2"])
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(None, [*base, "dpo.loss=ipo", "dpo.label_smoothing=0.1"])
