"""`tools/bench_context.py` runs its CP=1 and CP=2 measurements and writes its table; a CP=2 rank saves less for the
backward than one process holding the whole windows (half the tokens, plus the gathered keys and values)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_bench_context_writes_cp_columns(tmp_path):
    out = tmp_path / "BENCH.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.bench_context", "--config", "configs/tiny.yaml", "--lengths", "64", "128",
           "--tokens", "256", "--repeats", "1", "--cp", "2", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "CP=2 activations per rank MiB" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 64 ") or line.startswith("| 128 ")]
    assert len(rows) == 2
    for row in rows:
        whole, per_rank = float(row[5]), float(row[10])
        assert 0.4 * whole < per_rank < 0.8 * whole, row
