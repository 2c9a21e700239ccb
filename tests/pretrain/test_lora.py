"""LoRA fine-tuning through the trainer: the base stays frozen, checkpoints hold the adapters alone and resume
exactly, the adapted model loads merged for evaluation, `pretrain checkpoint merge` gives an ordinary checkpoint
that a next phase starts from, and DPO with LoRA uses the base (adapters off) as its reference without a copy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import MODEL, OPTIMIZER, CheckpointError, read_meta
from pretrain.cli import main
from pretrain.config import ConfigError, load_config
from pretrain.consolidate import full_tensors
from pretrain.evaluate import load_for_eval
from pretrain.model.flops import flops_per_token
from pretrain.trainer import Trainer

from .conftest import DPO, SFT
from .test_train_e2e import StopAfter, run, train_losses

LORA = ["lora.rank=4", "lora.alpha=8"]
STEPS = ["train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
         "train.checkpoint_every=2", "tracking.mlflow=false", "tracking.progress_bar=false"]


@pytest.fixture(scope="module")
def lora_sft(tiny_data, tiny_chat, base_run, tmp_path_factory):
    from .conftest import TINY_MODEL

    overrides = [*TINY_MODEL, f"data.dir={tiny_chat}", *SFT, *LORA, *STEPS,
                 f"train.init_from={base_run['checkpoint']}", "optim.lr=0.01"]
    run_dir = tmp_path_factory.mktemp("lora_sft")
    summary = run(overrides, run_dir)
    return {"overrides": overrides, "dir": run_dir, "summary": summary,
            "checkpoint": run_dir / "checkpoints" / "step_00000004"}


def test_only_the_adapters_train_and_checkpoints_hold_them_alone(lora_sft, base_run):
    assert lora_sft["summary"]["trainable_parameters"] == sum(t.numel() for t in
                                                              full_tensors(lora_sft["checkpoint"], MODEL).values())
    # MFU counts what a step computes: no weight gradients for the base (the weightless attention scores, a large
    # share at d_model 64, and the adapters keep it above 2/3 of full training here)
    full = flops_per_token(load_config(None, lora_sft["overrides"]).model, 128)
    assert 0.6 * full < lora_sft["summary"]["flops_per_token"] < 0.85 * full
    meta = read_meta(lora_sft["checkpoint"])
    stored = {k.removeprefix(MODEL) for k in meta.tensor_shapes() if k.startswith(MODEL)}
    assert stored and all(name.endswith((".lora_a", ".lora_b")) for name in stored)
    assert len(stored) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
    optimizer = {k.removeprefix(OPTIMIZER).rsplit("/", 1)[0] for k in meta.tensor_shapes() if k.startswith(OPTIMIZER)}
    assert optimizer == stored
    assert meta.state["lora_base"]["step"] == 4
    adapters = full_tensors(lora_sft["checkpoint"], MODEL)
    assert all(adapters[f"{m}.lora_b"].abs().max() > 0 for m in {n.rsplit(".", 1)[0] for n in stored})  # trained
    base_bytes = sum(f.bytes for f in read_meta(base_run["checkpoint"]).files.values())
    assert sum(f.bytes for f in meta.files.values()) < base_bytes / 4


def test_a_lora_run_resumes_exactly(lora_sft, tmp_path):
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(lora_sft["overrides"], crashed, extra_callbacks=[StopAfter(2)])
    resumed = run(lora_sft["overrides"], crashed, resume="auto")
    assert train_losses(crashed) == train_losses(lora_sft["dir"])
    assert resumed["val_loss"] == pytest.approx(lora_sft["summary"]["val_loss"], rel=1e-6)


def test_the_adapted_model_loads_merged_and_merge_writes_a_checkpoint_for_the_next_phase(lora_sft, tmp_path):
    loaded = load_for_eval(lora_sft["checkpoint"])  # base + adapters, merged
    cfg = load_config(None, lora_sft["overrides"])
    trainer = Trainer(cfg, tmp_path / "again")  # the adapted model as training computes it
    trainer.initialize_from(Path(cfg.train.init_from))
    trainer.resume(str(lora_sft["checkpoint"]))
    trainer.model.eval()
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), trainer.model(ids), rtol=0, atol=2e-5)

    merged = tmp_path / "merged"
    assert main(["checkpoint", "merge", str(lora_sft["checkpoint"]), str(merged)]) == 0
    meta = read_meta(merged)
    assert "lora_base" not in meta.state and meta.state["merged_from"]["step"] == 4
    assert not any(k.endswith((".lora_a", ".lora_b")) for k in meta.tensor_shapes())
    with torch.no_grad():
        torch.testing.assert_close(load_for_eval(merged).model(ids), loaded.model(ids), rtol=0, atol=0)

    # the adapters alone cannot start a phase; the merged checkpoint can
    plain = [o for o in lora_sft["overrides"] if not o.startswith(("lora.", "train.init_from"))]
    with pytest.raises(CheckpointError, match="checkpoint merge"):
        run([*plain, f"train.init_from={lora_sft['checkpoint']}", "train.steps=1"], tmp_path / "refused")
    summary = run([*plain, f"train.init_from={merged}", "train.steps=1", "train.eval_every=1"], tmp_path / "next")
    assert summary["initialized_from"]["path"] == str(merged)
    assert main(["checkpoint", "merge", str(lora_sft["checkpoint"]), str(merged)]) != 0  # never overwrites


def test_lora_config_errors(tiny_overrides, tiny_chat, base_run):
    chat = [*tiny_overrides, *SFT, f"data.dir={tiny_chat}", *LORA]
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, chat)
    start = f"train.init_from={base_run['checkpoint']}"
    with pytest.raises(ConfigError, match="lora.targets.*match no module"):
        load_config(None, [*chat, start, "lora.targets=[qkv]"])
    with pytest.raises(ConfigError, match="deepspeed.enabled"):
        load_config(None, [*chat, start, "deepspeed.enabled=true"])
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config(None, [*chat, start, "lora.dropout=0.1", "parallel.tp=2"])


def test_dpo_with_lora_takes_the_base_as_reference_without_a_copy(tiny_data, tiny_pairs, base_run, tmp_path):
    from .conftest import TINY_MODEL

    overrides = [*TINY_MODEL, *DPO, f"data.dir={tiny_pairs}", *LORA, f"train.init_from={base_run['checkpoint']}",
                 "train.eval_batches=1", "tracking.mlflow=false", "tracking.progress_bar=false", "optim.lr=0.01"]

    def losses(run_dir, copy_reference):
        trainer = Trainer(load_config(None, overrides), run_dir)
        trainer.initialize_from(Path(trainer.cfg.train.init_from))
        trainer.objective.take_reference(trainer.model, adapters=not copy_reference)
        return trainer, [trainer.train_step()["loss"] for _ in range(3)]

    trainer, shared = losses(tmp_path / "shared", copy_reference=False)
    reference = trainer.objective.reference
    assert reference.weights is None and reference.model is trainer.model  # no copy: the adapters switched off
    assert shared[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    assert abs(shared[2] - math.log(2)) > 1e-3  # the adapters moved the policy away from its reference
    _, copied = losses(tmp_path / "copied", copy_reference=True)  # a frozen whole copy, as without LoRA
    assert shared == pytest.approx(copied, abs=1e-6)
