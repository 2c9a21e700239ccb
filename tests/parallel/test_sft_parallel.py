"""Fine-tuning under data (and context) parallelism equals one process: SFT, where each rank's micro-batches hold
different numbers of supervised tokens and the loss is still the mean over the whole global batch's, and DPO, where
the loss and its reward metrics are means over the global batch's pairs. LoRA fine-tuning under tensor (+ sequence),
data and pipeline parallelism equals one process too, adapters cut like their base layers."""

from __future__ import annotations

import pytest

from tests.data.conftest import write_fortune_chat_folder
from tests.parallel.cli_runs import assert_curve_matches, assert_final_checkpoint_matches, train

SFT = ["data.format=chat", "data.document_masking=true", "model.max_seq_len=128", "data.seq_len=128"]
DPO = ["data.format=preference", "data.document_masking=true", "model.max_seq_len=256", "data.seq_len=256",
       "data.skip_invalid_records=true", "dpo.beta=0.5"]


@pytest.fixture(scope="module")
def chat_data(parallel_data, tmp_path_factory):
    return write_fortune_chat_folder(tmp_path_factory.mktemp("parallel_chat"), parallel_data / "tokenizer.json")


@pytest.fixture(scope="module")
def single_sft(chat_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single_sft") / "run"
    train(chat_data, run_dir, *SFT)
    return run_dir


@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.cp=2"], ["parallel.pp=2"], ["parallel.tp=2"]],
                         ids=["dp2", "cp2", "pp2", "tp2"])
def test_fine_tuning_on_two_ranks_matches_one_process(chat_data, single_sft, tmp_path, layout):
    run_dir = tmp_path / "run"
    train(chat_data, run_dir, *SFT, *layout, nproc=2)
    assert_curve_matches(run_dir, single_sft, also=("supervised_tokens",))


@pytest.fixture(scope="module")
def dpo_run(parallel_data, single, tmp_path_factory):
    """Pairs from the packaged Bible, and one process training on them from the reference run's checkpoint."""
    from data.preference_prepare import prepare_preference_dataset

    pairs = tmp_path_factory.mktemp("parallel_pairs")
    prepare_preference_dataset(pairs, ["bible"], parallel_data / "tokenizer.json", val_fraction=0.1,
                               max_per_source=300)
    options = [*DPO, f"train.init_from={single[0] / 'checkpoints' / 'step_00000008'}"]
    run_dir = tmp_path_factory.mktemp("single_dpo") / "run"
    train(pairs, run_dir, *options)
    return pairs, options, run_dir


@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]],
                         ids=["dp2", "tp2_sp"])
def test_dpo_on_two_ranks_matches_one_process(dpo_run, tmp_path, layout):
    """Under TP the policy's and the reference's logits are vocabulary slices: each reply's log-probability is
    summed from per-token values computed across the slices, and the reference shares the policy's sharded modules."""
    pairs, options, reference = dpo_run
    train(pairs, tmp_path / "run", *options, *layout, nproc=2)
    # the loss compares differences of summed reply log-probabilities (sums of ~100 fp32 terms of size ~5): their
    # rounding, amplified by beta and by 8 steps of training on it, reaches ~2e-5 when the sums are split over ranks
    assert_curve_matches(tmp_path / "run", reference, also=("pairs", "dpo/"), loss_atol=5e-5)


@pytest.fixture(scope="module")
def single_lora(chat_data, single, tmp_path_factory):
    """LoRA SFT on one process from the reference run's checkpoint (rank 4 on every projection)."""
    options = [*SFT, "lora.rank=4", "lora.alpha=8", "optim.lr=0.01",
               f"train.init_from={single[0] / 'checkpoints' / 'step_00000008'}"]
    run_dir = tmp_path_factory.mktemp("single_lora") / "run"
    train(chat_data, run_dir, *options)
    return options, run_dir


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.dp=2"],
                                    ["parallel.pp=2"]], ids=["tp2_sp", "dp2", "pp2"])
def test_lora_on_two_ranks_matches_one_process(chat_data, single_lora, tmp_path, layout):
    options, reference = single_lora
    train(chat_data, tmp_path / "run", *options, *layout, nproc=2)
    assert_curve_matches(tmp_path / "run", reference, also=("supervised_tokens",))
    assert_final_checkpoint_matches(tmp_path / "run", reference)  # the adapters (alone) and their AdamW states
