"""Checkpoints do not depend on the layout that wrote them: a run saved at one layout (tensor, sequence, context, data
or pipeline parallel, DeepSpeed ZeRO) resumes at another and continues the uninterrupted single-process loss curve,
optimizer state and data stream included (fp32, tolerance 2e-4 on the loss per step)."""

import shutil

import pytest

from tests.parallel.cli_runs import train

TOL = 2e-4
ZERO3_DP2 = ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=3"]


@pytest.mark.parametrize(
    "writer,reader",
    [
        (["parallel.tp=2", "parallel.sequence_parallel=true"], []),  # TP=2 (+SP) -> TP=1
        (["parallel.dp=2"], []),  # DP=2 -> DP=1
        (["parallel.tp=2"], ["parallel.dp=2"]),  # TP=2 -> DP=2
        (["parallel.pp=2"], []),  # PP=2 -> PP=1
        (["parallel.pp=2"], ["parallel.tp=2"]),  # PP=2 -> TP=2
        (ZERO3_DP2, ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=1"]),  # ZeRO-3 -> ZeRO-1
        (ZERO3_DP2, ["parallel.dp=2"]),  # ZeRO-3 -> plain DP=2
        (ZERO3_DP2, []),  # ZeRO-3 DP=2 -> one process
        (["parallel.tp=2"], ["parallel.dp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=2"]),  # TP2 -> ZeRO-2
        (["parallel.pp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=1"], []),  # PP2 + ZeRO-1 -> one process
        # background saves and recomputed blocks: TP2+SP, selective -> PP2, full
        (["parallel.tp=2", "parallel.sequence_parallel=true", "train.async_checkpoint=true",
          "train.activation_checkpointing=selective"], ["parallel.pp=2", "train.activation_checkpointing=full"]),
        (["parallel.cp=2"], ["parallel.tp=2"]),  # CP=2 -> TP=2: a sequence split over ranks leaves no trace
    ],
    ids=["tp2sp->tp1", "dp2->dp1", "tp2->dp2", "pp2->pp1", "pp2->tp2", "zero3->zero1", "zero3->dp2", "zero3->dp1",
         "tp2->zero2", "pp2zero1->dp1", "tp2sp async selective->pp2 full", "cp2->tp2"],
)
def test_resume_at_another_layout_continues_the_curve(parallel_data, single, shared_run, tmp_path, writer, reader):
    _, reference = single
    written, sharded = shared_run(*writer, nproc=2)
    for step in range(1, 9):
        assert abs(sharded[step] - reference[step]) < TOL, (step, sharded[step], reference[step])
    checkpoint = written / "checkpoints" / "step_00000004"
    nproc = 2 if reader else None
    resumed = train(parallel_data, tmp_path / "resumed", *reader, nproc=nproc, resume=checkpoint)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert abs(resumed[step] - reference[step]) < TOL, (step, resumed[step], reference[step])


@pytest.mark.parametrize("reader", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp1->tp2", "pp1->pp2"])
def test_single_process_checkpoint_resumes_sharded(parallel_data, single, tmp_path, reader):
    run_dir, reference = single
    resumed = train(parallel_data, tmp_path / "resumed", *reader, nproc=2,
                    resume=run_dir / "checkpoints" / "step_00000004")
    for step in range(5, 9):
        assert abs(resumed[step] - reference[step]) < TOL, (step, resumed[step], reference[step])


def test_corrupt_newest_checkpoint_is_skipped_by_every_rank(parallel_data, single, tmp_path):
    """`--resume auto` on 2 ranks: the reading ranks find the newest checkpoint's shard corrupt, all of them fall
    back to the previous one together and the curve continues from there."""
    run_dir, reference = single
    shutil.copytree(run_dir / "checkpoints", tmp_path / "run" / "checkpoints")
    (shard,) = (tmp_path / "run" / "checkpoints" / "step_00000008" / "shards").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = train(parallel_data, tmp_path / "run", "parallel.tp=2", nproc=2, resume="auto")
    assert sorted(resumed) == [5, 6, 7, 8]  # from step 4: step 8's checkpoint was refused
    for step in range(5, 9):
        assert abs(resumed[step] - reference[step]) < TOL, (step, resumed[step], reference[step])


def test_a_later_phase_starts_from_a_checkpoint_at_another_layout(parallel_data, single, tmp_path):
    """`--init-from` (here a context extension: YaRN, twice the length) on TP=2+SP follows the same phase run in
    one process from the same single-process checkpoint."""
    run_dir, _ = single
    phase = ["--init-from", str(run_dir / "checkpoints" / "step_00000004"), "model.max_seq_len=128",
             "data.seq_len=128", "model.rope.scaling=yarn", "model.rope.factor=2", "model.rope.original_max_seq_len=64",
             "train.steps=4"]
    one = train(parallel_data, tmp_path / "one", *phase)
    sharded = train(parallel_data, tmp_path / "tp2", *phase, "parallel.tp=2", "parallel.sequence_parallel=true",
                    nproc=2)
    assert sorted(one) == sorted(sharded) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert abs(sharded[step] - one[step]) < TOL, (step, sharded[step], one[step])


def test_no_usable_checkpoint_is_one_clear_error_on_two_ranks(parallel_data, single, tmp_path):
    """Every rank finds the same problem: the command says what it is (exit 1), not that a rank died."""
    import os
    import subprocess
    import sys

    from tests.parallel.cli_runs import ROOT, overrides

    run_dir, _ = single
    shutil.copytree(run_dir / "checkpoints", tmp_path / "run" / "checkpoints")
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step_*"):
        (checkpoint / "meta.json").unlink()
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"),
           *overrides(parallel_data), "parallel.tp=2", "--nproc", "2", "--resume", "auto"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "error: no usable checkpoint" in output, output[-3000:]
    assert "CollectiveError" not in output and "meta.json is missing" in output
