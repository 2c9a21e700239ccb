import pytest

from data.prepare import prepare_dataset


@pytest.fixture(scope="session")
def parallel_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_data")
    prepare_dataset(out, sources=["fortunes"], vocab_size=512, val_fraction=0.02, shard_tokens=50_000, seed=0)
    return out


@pytest.fixture(scope="session")
def single(parallel_data, tmp_path_factory):
    """The reference: one process, plain engine, 8 steps, checkpoints at steps 4 and 8."""
    from tests.parallel.cli_runs import train

    run_dir = tmp_path_factory.mktemp("single") / "run"
    return run_dir, train(parallel_data, run_dir)
