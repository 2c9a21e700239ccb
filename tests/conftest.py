"""Session fixtures shared by several test folders: the tiny pretraining data and a 4-step run of the tiny model."""

import pytest

from data.prepare import prepare_dataset

TINY_MODEL = [
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.num_workers=1",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.precision=fp32",
    "train.threads=1",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Real text (the Debian fortunes corpus), a 512-token BPE, small shards."""
    out = tmp_path_factory.mktemp("tiny_data")
    prepare_dataset(out_dir=out, sources=["fortunes"], vocab_size=512, val_fraction=0.02, shard_tokens=50_000, seed=0)
    return out


@pytest.fixture
def tiny_overrides(tiny_data):
    return [*TINY_MODEL, f"data.dir={tiny_data}"]


BASE_RUN = ["train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
            "train.checkpoint_every=4", "tracking.mlflow=false", "tracking.progress_bar=false"]


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, tiny_data):
    """A 4-step run of the tiny model, its checkpoint at step 4: the starting point of later phases."""
    from pretrain.callbacks import default_callbacks
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("base_run")
    cfg = load_config(None, [*TINY_MODEL, f"data.dir={tiny_data}", *BASE_RUN])
    summary = Trainer(cfg, run_dir, default_callbacks(cfg, run_dir)).fit()
    return {"dir": run_dir, "checkpoint": run_dir / "checkpoints" / "step_00000004", "summary": summary}
