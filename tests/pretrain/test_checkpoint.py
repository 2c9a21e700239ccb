"""Checkpoints: exact round trip, atomic under a kill mid-save, corruption named, pruning, background saves,
pieces of tensors reassembled whole (resharding across processes is in tests/parallel/test_layout_resume.py)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.checkpoint import (
    MODEL,
    OPTIMIZER,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    model_tensors,
    optimizer_tensors,
    pieces,
    read_meta,
    read_pieces,
    rng_tensors,
    verify,
)
from pretrain.consolidate import consolidate, full_tensors


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


def save(manager, step, model, opt, state=None, asynchronous=False):
    tensors = pieces(model_tensors(model), optimizer_tensors(model, opt), rng_tensors())
    return manager.save(step, tensors, state or {}, "a: 1\n", asynchronous=asynchronous).wait()


def shard_file(checkpoint):
    (file,) = (checkpoint / "shards").glob("*.safetensors")
    return file


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


def test_pruning_keeps_the_checkpoint_just_written_and_moves_incomplete_ones_aside(tmp_path, caplog):
    model, opt = trained_toy(1)
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 6, model, opt)  # a later step of an abandoned continuation, written first
    save(manager, 5, model, opt)  # the run resumed from an older checkpoint writes step 5 now
    assert [p.name for p in manager.checkpoints()] == ["step_00000005"]  # by name order, 6 would have won
    assert manager.latest_valid().name == "step_00000005"

    manager = CheckpointManager(tmp_path / "b", keep_last=2)
    save(manager, 1, model, opt)
    (save(manager, 2, model, opt) / "meta.json").unlink()  # incomplete
    save(manager, 3, model, opt)
    assert [p.name for p in manager.checkpoints()] == ["step_00000001", "step_00000003"]
    assert (tmp_path / "b" / "invalid" / "step_00000002" / "shards").is_dir()  # kept for a look, not deleted
    assert "moved unusable checkpoint" in caplog.text and "meta.json is missing" in caplog.text


def test_malformed_meta_is_a_checkpoint_error(tmp_path):
    model, opt = trained_toy(1)
    path = save(CheckpointManager(tmp_path), 1, model, opt)
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="meta.json is malformed: its 'files' entry"):
        read_meta(path)


def test_corrupt_shard_is_named_by_the_reader(tmp_path):
    model, opt = trained_toy(1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    save(manager, 1, model, opt)
    newest = save(manager, 2, model, opt)
    shard = shard_file(newest)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    read_meta(newest)  # sizes match: only a reader hashing the file can tell
    with pytest.raises(CheckpointError, match=shard.name):
        verify(newest, contents=True)
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt"):
        load_checkpoint(newest, TiedToy())


def test_truncated_or_missing_shard_makes_the_checkpoint_incomplete(tmp_path):
    model, opt = trained_toy(1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    first = save(manager, 1, model, opt)
    newest = save(manager, 2, model, opt)
    shard = shard_file(newest)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is .* bytes.*truncated"):
        read_meta(newest)
    assert manager.latest_valid() == first
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        read_meta(newest)


def test_missing_meta_means_incomplete(tmp_path):
    model, opt = trained_toy(1)
    path = save(CheckpointManager(tmp_path), 1, model, opt)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(path)


def test_a_path_that_is_not_a_checkpoint_names_the_checkpoints_near_it(tmp_path):
    model, opt = trained_toy(1)
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    for step in (1, 2):
        save(manager, step, model, opt)
    with pytest.raises(CheckpointError, match=r"step_00000009 does not exist \(train.keep_last.*holds "
                                              r"step_00000001, step_00000002"):
        read_meta(manager.root / "step_00000009")
    for folder in (tmp_path / "run", manager.root):  # a run folder or its checkpoints folder
        with pytest.raises(CheckpointError, match=r"folder of checkpoints, not a checkpoint.*step_00000002"):
            read_meta(folder)
    with pytest.raises(CheckpointError, match=r"checkpoint \S+nowhere does not exist$"):
        read_meta(tmp_path / "nowhere")


def test_model_that_does_not_fit_is_named(tmp_path):
    model, opt = trained_toy(1)
    path = save(CheckpointManager(tmp_path), 1, model, opt)

    class Wider(TiedToy):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match="extra"):
        load_checkpoint(path, Wider())


def test_save_killed_midway_leaves_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from tests.pretrain.test_checkpoint import trained_toy, save
        from pretrain.checkpoint import CheckpointManager
        model, opt = trained_toy(2)
        manager = CheckpointManager({str(tmp_path)!r}, keep_last=2)
        save(manager, 1, model, opt, {{"mark": 1}})
        with torch.no_grad():
            model.proj.weight.add_(1.0)
        os.environ["PRETRAIN_TEST_PAUSE_IN_SAVE"] = "before_rename"
        save(manager, 2, model, opt, {{"mark": 2}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    tmp_dir = tmp_path / ".tmp-step_00000002"
    while time.time() < deadline and proc.poll() is None:
        if (tmp_dir / "meta.json").exists():  # shards and meta written, not yet renamed into place
            break
        time.sleep(0.1)
    assert (tmp_dir / "meta.json").exists(), "the save never reached its midpoint"
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


def test_save_killed_after_the_rename_keeps_both_checkpoints_until_the_next_save_prunes(tmp_path):
    """Killed after the new checkpoint is in place but before the old ones are pruned (keep_last=1): both are
    valid, the new one is the one resumed from, and the next save prunes."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.pretrain.test_checkpoint import trained_toy, save
        from pretrain.checkpoint import CheckpointManager
        model, opt = trained_toy(2)
        manager = CheckpointManager({str(tmp_path)!r}, keep_last=1)
        save(manager, 1, model, opt, {{"mark": 1}})
        os.environ["PRETRAIN_TEST_PAUSE_IN_SAVE"] = "before_prune"
        save(manager, 2, model, opt, {{"mark": 2}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "step_00000002" / "meta.json").exists():
        time.sleep(0.1)
    assert (tmp_path / "step_00000002" / "meta.json").exists(), "the save never reached its rename"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    manager = CheckpointManager(tmp_path, keep_last=1)
    complete, broken = manager.survey()
    assert [p.name for p in complete] == ["step_00000001", "step_00000002"] and not broken
    assert load_checkpoint(manager.latest_valid(), TiedToy(), restore_rng_state=False).state == {"mark": 2}
    model, opt = trained_toy(1)
    save(manager, 3, model, opt)
    assert [p.name for p in manager.checkpoints()] == ["step_00000003"]


def test_background_save_writes_the_values_of_the_moment_it_was_asked(tmp_path):
    model, opt = trained_toy(2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = pieces(model_tensors(model), optimizer_tensors(model, opt), rng_tensors())
    pending = CheckpointManager(tmp_path).save(5, tensors, {"mark": 5}, "", asynchronous=True)
    with torch.no_grad():  # training goes on while the files are written
        for p in model.parameters():
            p.add_(1.0)
    path = pending.wait()
    fresh = TiedToy()
    assert load_checkpoint(path, fresh, restore_rng_state=False).state == {"mark": 5}
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_pieces_must_cover_their_tensors(tmp_path):
    """A save whose pieces leave part of a tensor unwritten fails, naming the tensor, and leaves nothing behind."""
    manager = CheckpointManager(tmp_path)
    tensors = {MODEL + "w": torch.zeros(2, 6), MODEL + "b": torch.ones(3)}
    with pytest.raises(CheckpointError, match="'model/w' cover 12 of its 24 elements"):
        manager.save(1, tensors, {}, "", {MODEL + "w": ((4, 6), (2, 0))}).wait()
    assert manager.checkpoints() == []
    path = manager.save(1, tensors, {}, "", {MODEL + "w": ((2, 6), (0, 0))}).wait()
    assert read_meta(path).tensor_shapes() == {MODEL + "w": ((2, 6), torch.float32), MODEL + "b": ((3,), torch.float32)}


def test_consolidate_writes_whole_tensors_streamed_and_split(tmp_path):
    from safetensors.torch import load_file

    model, opt = trained_toy(2)
    path = save(CheckpointManager(tmp_path / "ckpt"), 2, model, opt)
    files = consolidate(path, tmp_path / "whole")
    assert [f.name for f in files] == ["model.safetensors"]
    whole = load_file(files[0])
    assert whole.keys() == model_tensors(model).keys()  # tied weight once
    for name, value in model_tensors(model).items():
        assert torch.equal(whole[name], value), name
    assert (tmp_path / "whole" / "config.yaml").read_text() == "a: 1\n"

    split = consolidate(path, tmp_path / "split", part="optimizer", dtype=torch.bfloat16, max_file_size=200)
    assert len(split) > 1
    index = json.loads((tmp_path / "split" / "optimizer.safetensors.index.json").read_text())
    loaded = {}
    for f in split:
        loaded |= load_file(f)
    assert set(index["weight_map"]) == set(loaded) == set(optimizer_tensors(model, opt))
    for name, value in optimizer_tensors(model, opt).items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], value.to(torch.bfloat16)), name
    assert full_tensors(path, OPTIMIZER).keys() == optimizer_tensors(model, opt).keys()


def test_checkpoint_commands(tmp_path, capsys):
    from safetensors.torch import load_file

    from pretrain.cli import main

    model, opt = trained_toy(2)
    path = save(CheckpointManager(tmp_path / "ckpt"), 2, model, opt)
    assert main(["checkpoint", "verify", str(path)]) == 0
    assert "step 2, 1 shard file(s)" in capsys.readouterr().out
    assert main(["checkpoint", "consolidate", str(path), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == model_tensors(model).keys()
    assert main(["checkpoint", "consolidate", str(path), str(tmp_path / "out"), "--max-file-size", "lots"]) == 2
    assert "--max-file-size" in capsys.readouterr().err
    shard = shard_file(path)
    shard.write_bytes(shard.read_bytes()[:100] + b"x" + shard.read_bytes()[101:])
    assert main(["checkpoint", "verify", str(path)]) == 1
    assert f"{shard.name} is corrupt" in capsys.readouterr().err


def _two_rank_load(rank: int, root: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    full = torch.arange(24, dtype=torch.float32).view(4, 6)
    rows = {r: ((4, 6), (2 * r, 0)) for r in range(2)}
    path = CheckpointManager(Path(root) / "ckpt").save(1, {MODEL + "w": full[2 * rank : 2 * rank + 2].clone()}, {},
                                                      "", {MODEL + "w": rows[rank]}).wait()
    calls = []
    real = HuggingFaceStorageReader.read_metadata
    HuggingFaceStorageReader.read_metadata = lambda self: calls.append(1) or real(self)
    other = 1 - rank
    got = read_pieces(read_meta(path), {MODEL + "w": torch.empty(2, 6)}, {MODEL + "w": rows[other]})
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "headers_read": len(calls), "rows_match": torch.equal(got[MODEL + "w"], full[2 * other : 2 * other + 2])}))
    dist.destroy_process_group()


def test_only_the_first_rank_reads_the_shard_headers(tmp_path):
    """Loading on 2 ranks, each taking the rows the other wrote: the files' headers (shapes, offsets) are read by
    rank 0 alone and sent to rank 1, not read by every rank."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_load, args=(str(tmp_path), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rows_match"] for r in results] == [True, True]
    assert [r["headers_read"] for r in results] == [1, 0]


def test_a_shard_file_is_hashed_once_however_many_reads_use_it(tmp_path, monkeypatch):
    """A ZeRO resume reads a checkpoint twice (the weights, then its partitions of the optimizer states): the second
    read trusts the files the first one checked and the shard headers it read, and a file it had not read yet is
    still checked."""
    import pretrain.sharded_io as sharded_io

    model, opt = trained_toy()
    path = save(CheckpointManager(tmp_path), 1, model, opt)
    hashed, headers_read = [], []
    real_hash, real_headers = sharded_io.sha256_file, sharded_io.HuggingFaceStorageReader.read_metadata
    monkeypatch.setattr(sharded_io, "sha256_file", lambda file: hashed.append(file.name) or real_hash(file))
    monkeypatch.setattr(sharded_io.HuggingFaceStorageReader, "read_metadata",
                        lambda reader: headers_read.append(reader.path) or real_headers(reader))
    meta = read_meta(path)
    names = list(meta.tensors)
    for name in names[:1], names[1:]:
        read_pieces(meta, {key: torch.empty(meta.tensors[key].shape, dtype=meta.tensors[key].dtype) for key in name})
    assert hashed == [shard_file(path).name] and len(headers_read) == 1
    read_pieces(read_meta(path), {names[0]: torch.empty(meta.tensors[names[0]].shape,
                                                         dtype=meta.tensors[names[0]].dtype)})
    assert hashed == [shard_file(path).name] * 2  # another reading of the checkpoint checks it again
    assert len(headers_read) == 2
