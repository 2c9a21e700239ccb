"""tools/bench_gpu.py runs where a GPU is lent, never in CI: its `--smoke-cpu` mode runs the same code paths on
the CPU at toy sizes, so the script cannot rot between GPU sessions. Every section must produce numbers, not an
error entry, and the markdown must render them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_benchmark_script_runs_every_moe_section_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tools.bench_gpu", "--smoke-cpu", "--moe-only", "--quick",
                           "--json", str(out), "--out", str(tmp_path / "BENCH.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["ceilings"]["matmul_tflops"] > 0
    measured = [r for r in results["throughput"] if "error" not in r and r["tokens_per_s"] > 0]
    assert {r["options"] for r in measured if r["name"] == "MoE 64x top-6 + MTP"} == {
        "eager", "bf16 weights", "selective recompute"}  # each optimization's before/after
    assert all("error" not in r and r["ratio"] > 0 for r in results["moe_layer"])
    assert "grouped_mm" in results["moe_profile"]
    text = (tmp_path / "BENCH.md").read_text()
    assert "MoE layer" in text and "| MoE 64x top-6 + MTP |" in text and "| bf16 weights |" in text
