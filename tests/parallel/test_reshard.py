"""`pretrain convert reshard`: a checkpoint (or `consolidate --part all` whole tensors) rewritten as the checkpoint
another layout writes, by that layout's processes (gloo). Proven by identity with what real runs wrote (TP=2 ->
whole tensors -> TP=2 gives back the run's own shard files, headers and data; a TP=2 x PP=2 x EP=2 (+SP) MLA +
MoE + MTP run exports to the same Hugging Face folder as its weights resharded into one process) and by resuming
(a resharded checkpoint continues the one-process loss curve)."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import OPTIMIZER, RNG, read_meta
from pretrain.consolidate import full_tensors
from tests.parallel.cli_runs import ROOT, train, train_metrics
from tests.parallel.test_moe_parallel import MLA, MOE, MTP


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def shard_contents(checkpoint: Path) -> dict[str, tuple[dict, str]]:
    """Each shard file's parsed header (tensors, their offsets in the file and in the full tensors) and the sha256
    of its data. Not the file's own hash: safetensors writes the header's metadata keys in a per-process random
    order, so even one run saving the same tensors twice writes different bytes there."""
    out = {}
    for file in sorted((checkpoint / "shards").iterdir()):
        raw = file.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        header["__metadata__"]["DCP_SHARDING_INFO"] = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        out[file.name] = (header, hashlib.sha256(raw[8 + size:]).hexdigest())
    return out


def all_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return full_tensors(checkpoint, "")


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def tp2_run(shared_run) -> Path:
    return shared_run("parallel.tp=2", nproc=2)[0]


def test_tp2_to_whole_tensors_and_back_gives_the_runs_own_shard_files(tp2_run, tmp_path):
    original = tp2_run / "checkpoints/step_00000008"
    ok(cli("checkpoint", "consolidate", original, tmp_path / "whole", "--part", "all"))
    out = ok(cli("convert", "reshard", tmp_path / "whole", tmp_path / "back", "parallel.tp=2"))
    assert "2 processes" in out and "2 shard file(s)" in out
    back = tmp_path / "back"
    assert shard_contents(back) == shard_contents(original)  # each rank's file: its header and data bytes
    got, want = read_meta(back), read_meta(original)
    assert got.step == want.step == 8 and got.state == want.state and got.tensors == want.tensors
    assert got.layout["tp"] == 2 and got.layout["resharded_from"] == str((tmp_path / "whole").resolve())
    assert (back / "config.yaml").read_text() == (original / "config.yaml").read_text()
    assert not list(tmp_path.glob(".tmp-*"))


def test_whole_tensors_become_a_one_process_checkpoint_equal_to_the_source(tp2_run, tmp_path):
    original = tp2_run / "checkpoints/step_00000008"
    ok(cli("convert", "consolidate", original, tmp_path / "whole", "--part", "all", "--max-file-size", "100KB"))
    assert len(list((tmp_path / "whole").glob("all-*.safetensors"))) > 1  # read through the index
    ok(cli("convert", "reshard", tmp_path / "whole", tmp_path / "one", "parallel.tp=1"))
    one = read_meta(tmp_path / "one")
    assert len(one.files) == 1 and one.layout["world_size"] == 1 and one.state == read_meta(original).state
    tensors = all_tensors(tmp_path / "one")
    assert any(k.startswith(OPTIMIZER) for k in tensors) and any(k.startswith(RNG) for k in tensors)
    assert_same_tensors(tensors, all_tensors(original))


def test_a_resharded_checkpoint_resumes_on_its_layout_and_continues_the_curve(parallel_data, single, tmp_path):
    """One process -> PP=2: each stage's file holds its own layers only, and training goes on as one process."""
    single_dir, _ = single
    ok(cli("convert", "reshard", single_dir / "checkpoints/step_00000004", tmp_path / "pp2", "parallel.pp=2"))
    files = read_meta(tmp_path / "pp2").files
    assert len(files) == 2
    from safetensors import safe_open

    layers = {}
    for name in files:
        with safe_open(tmp_path / "pp2/shards" / name, framework="pt") as f:
            layers[name] = {int(m[1]) for k in f.keys() if (m := re.search(r"/layers\.(\d+)\.", k))}
    assert [layers[name] for name in sorted(layers)] == [{0}, {1}]
    resumed = train(parallel_data, tmp_path / "resumed", "parallel.pp=2", nproc=2, resume=tmp_path / "pp2")
    want = train_metrics(single_dir)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert abs(resumed[step] - want[step]["loss"]) < 2e-4, (step, resumed[step], want[step]["loss"])


def test_a_tp_pp_ep_run_exports_to_the_same_hf_folder_as_its_weights_on_one_process(parallel_data, tmp_path):
    """An 8-process MLA + MoE + MTP run (TP=2 with SP, PP=2, DP=2 with EP=2): its checkpoint and the same weights
    resharded into one process export to byte-identical DeepSeek-V3 folders (MTP layer included); resharding the
    one-process checkpoint back to the run's layout gives the run's own shard files."""
    from tools.convert_hf import export_hf

    layout = ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
              "train.micro_batch_size=2"]  # two micro-batches per step fill the two stages
    run = tmp_path / "run"
    model = [*MLA, *MOE, *MTP, "model.norm_eps=1e-6"]  # DeepSeek-V3's latent norms' eps: exportable
    train(parallel_data, run, *model, *layout, "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2",
          nproc=8)
    written = run / "checkpoints/step_00000002"
    assert len(read_meta(written).files) > 4  # the pieces of eight ranks
    ok(cli("convert", "reshard", written, tmp_path / "one", "parallel.tp=1", "parallel.sequence_parallel=false",
           "parallel.pp=1", "parallel.dp=1", "parallel.ep=1"))
    assert len(read_meta(tmp_path / "one").files) == 1
    for source, folder in [(written, "hf_run"), (tmp_path / "one", "hf_one")]:
        export_hf(source, tmp_path / folder, None, None, None, False, "keep")
    record = json.loads((tmp_path / "hf_run/conversion.json").read_text())
    assert record["target"]["architecture"] == "DeepseekV3ForCausalLM" and record["mtp"]["written"] == 1
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "hf_run" / name).read_bytes() == (tmp_path / "hf_one" / name).read_bytes(), name
    ok(cli("convert", "reshard", tmp_path / "one", tmp_path / "back", *layout))
    assert shard_contents(tmp_path / "back") == shard_contents(written)


def test_bad_requests_fail_before_any_process_and_leave_nothing(tp2_run, tmp_path):
    original = tp2_run / "checkpoints/step_00000008"
    model_change = cli("convert", "reshard", original, tmp_path / "out", "model.n_layers=4")
    assert model_change.returncode == 2 and "parallel layout only" in model_change.stderr
    (tmp_path / "exists").mkdir()
    assert cli("convert", "reshard", original, tmp_path / "exists").returncode == 2
    ok(cli("checkpoint", "consolidate", original, tmp_path / "weights_only"))  # --part model: no optimizer
    weights_only = cli("convert", "reshard", tmp_path / "weights_only", tmp_path / "out")
    assert weights_only.returncode == 1 and "--part all" in weights_only.stderr
    bad_layout = cli("convert", "reshard", original, tmp_path / "out", "parallel.ep=3")
    assert bad_layout.returncode == 2 and "parallel.ep" in bad_layout.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "weights_only"]


def test_a_corrupt_source_names_the_file_and_leaves_no_output(tp2_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tp2_run / "checkpoints/step_00000008", copy)
    shard = sorted((copy / "shards").iterdir())[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("convert", "reshard", copy, tmp_path / "out", "parallel.tp=2")
    assert result.returncode != 0 and shard.name in result.stdout + result.stderr and "corrupt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
