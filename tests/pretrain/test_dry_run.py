"""`pretrain train CONFIG --dry-run`: validates, counts and exits without processes, data or a run folder."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_data(tmp_path):
    """A data folder that does not exist: a dry run (on a laptop, say) needs none."""
    return tmp_path / "not_prepared"


def dry_run(config, *args):
    return subprocess.run([sys.executable, "-m", "pretrain.cli", "train", config, "--dry-run", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_deepseek_v3(no_data, tmp_path):
    run_dir = tmp_path / "run"
    result = dry_run("configs/deepseek_v3.yaml", "--run-dir", str(run_dir), f"data.dir={no_data}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters (without MTP):   671,026,404,352 (671.03B)" in out
    assert "activated per token:        37,552,282,624 (37.55B); without the input embedding 36,625,603,584" in out
    assert "MTP modules (own weights):  11,610,067,968 (11.61B)" in out
    assert "tokens per step:            62,914,560 (15360 sequences x 4096)" in out
    assert "training FLOPs per token:   2.918e+11" in out
    assert not run_dir.exists() and not no_data.exists()
    assert dry_run("configs/deepseek_v3.yaml", "--nproc", "2048", f"data.dir={no_data}").returncode == 0
    wrong = dry_run("configs/deepseek_v3.yaml", "--nproc", "8", f"data.dir={no_data}")
    assert wrong.returncode == 2 and "2048 processes, but 8 were launched" in wrong.stderr
    bad = dry_run("configs/deepseek_v3.yaml", f"data.dir={no_data}", "parallel.tp=3", "parallel.dp=64")
    assert bad.returncode == 2 and "not divisible by parallel.tp=3" in bad.stderr


def test_tiny(no_data, tmp_path):
    run_dir = tmp_path / "run"
    result = dry_run("configs/tiny.yaml", "--run-dir", str(run_dir), f"data.dir={no_data}", "train.steps=5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GQA (4 KV heads)" in out and "parameters (without MTP):   4,000,000 (4.00M)" in out
    assert "4,096 (16 sequences x 256)" in out and "MTP modules" not in out
    assert not run_dir.exists()
