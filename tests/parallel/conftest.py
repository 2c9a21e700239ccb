from pathlib import Path

import pytest

from data.prepare import prepare_dataset


@pytest.fixture(scope="session")
def parallel_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_data")
    prepare_dataset(out, sources=["fortunes"], vocab_size=512, val_fraction=0.02, shard_tokens=50_000, seed=0)
    return out


@pytest.fixture(scope="session")
def shared_run(parallel_data, tmp_path_factory):
    """`shared_run(*overrides, nproc=N)` -> (run folder, {step: loss}) of `train`: runs that several tests read but
    none changes (their curves, their checkpoints to resume or convert elsewhere) run once per session."""
    from tests.parallel.cli_runs import train, train_metrics

    done: dict[tuple, Path] = {}

    def run(*overrides: str, nproc: int | None = None):
        key = (overrides, nproc)
        if key not in done:
            run_dir = tmp_path_factory.mktemp("shared_run") / "run"
            train(parallel_data, run_dir, *overrides, nproc=nproc)
            done[key] = run_dir
        return done[key], {step: r["loss"] for step, r in train_metrics(done[key]).items()}

    return run


@pytest.fixture(scope="session")
def single(shared_run):
    """The reference: one process, plain engine, 8 steps, checkpoints at steps 4 and 8."""
    return shared_run()
