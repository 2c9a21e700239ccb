"""Checkpoints: exact round trip, atomic under a kill mid-save, corruption named, pruning."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from pretrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    model_tensors,
    optimizer_tensors,
    verify,
)


class TiedToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.proj(self.embed(x)))


def trained_toy(steps=3, seed=0):
    torch.manual_seed(seed)
    model = TiedToy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, 10, (2, 5))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(manager, step, model, opt, state=None):
    return manager.save(step, model_tensors(model), optimizer_tensors(model, opt), state or {}, "a: 1\n")


def test_round_trip_model_optimizer_rng_state(tmp_path):
    model, opt = trained_toy()
    manager = CheckpointManager(tmp_path, keep_last=2)
    torch.manual_seed(42)
    path = save(manager, 3, model, opt, {"tokens_seen": 123, "loader": {"consumed": 6}})
    expected_rand = torch.rand(3)

    fresh = TiedToy()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    loaded = load_checkpoint(path, fresh, fresh_opt)
    assert loaded.step == 3 and loaded.state == {"tokens_seen": 123, "loader": {"consumed": 6}}
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert fresh.head.weight is fresh.embed.weight  # still tied after loading
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored

    # The restored optimizer continues exactly like the original.
    x = torch.randint(0, 10, (2, 5))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).logsumexp(-1).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_keeps_last_k(tmp_path):
    model, opt = trained_toy(1)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        save(manager, step, model, opt)
    assert [p.name for p in manager.checkpoints()] == ["step_00000003", "step_00000004"]
    assert manager.latest_valid().name == "step_00000004"


def test_corrupt_file_is_named_and_skipped_by_auto_resume(tmp_path):
    model, opt = trained_toy(1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    save(manager, 1, model, opt)
    newest = save(manager, 2, model, opt)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify(newest)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(newest, TiedToy())
    assert manager.latest_valid().name == "step_00000001"


def test_missing_meta_means_incomplete(tmp_path):
    model, opt = trained_toy(1)
    path = save(CheckpointManager(tmp_path), 1, model, opt)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(path)


def test_save_killed_midway_leaves_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from tests.pretrain.test_checkpoint import trained_toy
        from pretrain.checkpoint import CheckpointManager, model_tensors, optimizer_tensors
        model, opt = trained_toy(2)
        manager = CheckpointManager({str(tmp_path)!r}, keep_last=2)
        manager.save(1, model_tensors(model), optimizer_tensors(model, opt), {{"mark": 1}}, "")
        with torch.no_grad():
            model.proj.weight.add_(1.0)
        os.environ["PRETRAIN_TEST_PAUSE_IN_SAVE"] = "after_tensors"
        manager.save(2, model_tensors(model), optimizer_tensors(model, opt), {{"mark": 2}}, "")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    tmp_dirs = []
    while time.time() < deadline and proc.poll() is None:
        tmp_dirs = list(tmp_path.glob(".tmp-step_00000002-*"))
        if tmp_dirs and (tmp_dirs[0] / "config.yaml").exists():
            break
        time.sleep(0.1)
    assert tmp_dirs, "the save never reached its midpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    manager = CheckpointManager(tmp_path, keep_last=2)
    latest = manager.latest_valid()
    assert latest is not None and latest.name == "step_00000001"
    loaded = load_checkpoint(latest, TiedToy(), restore_rng_state=False)
    assert loaded.state == {"mark": 1}
    # The next save cleans the leftover temporary folder.
    model, opt = trained_toy(1)
    save(manager, 3, model, opt)
    assert not list(tmp_path.glob(".tmp-*"))
