"""`pretrain cost report`: DeepSeek-V3's published phase figures reproduced exactly in every format, the split into
productive, overhead and badput hours by hand, the plot's bars, the estimate it compares with, and bad input."""

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from cluster.accounting import CATEGORIES, LEDGER_FILE, Attempt, Ledger
from cluster.gpu_specs import lookup
from pretrain.cli import main
from tools.cost_estimate import estimate, gpu_hours, parse_tokens
from tools.cost_report import REPORT_MD, REPORT_PNG, build_report, format_report, plot_report, write_cost_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H800_GPUS = 2048  # DeepSeek-V3's cluster


def attempt(accelerators, hardware, number=1, **seconds):
    return Attempt(number=number, started_at=0.0, updated_at=0.0, accelerators=accelerators, hardware=hardware,
                   first_step=0, last_step=1, status="finished",
                   seconds={**dict.fromkeys(CATEGORIES, 0.0), **seconds})


def write_recipe(root, phases, order=None):
    """A recipe folder: one sub-folder per phase with its ledger, and results.json listing the phases in order."""
    root.mkdir(parents=True, exist_ok=True)
    for ledger in phases:
        (root / ledger.phase).mkdir()
        ledger.save(root / ledger.phase / LEDGER_FILE)
    (root / "results.json").write_text(json.dumps([{"phase": p} for p in order or [p.phase for p in phases]]))
    return root


def h800_phase(name, gpu_hours_published, **fields):
    """All of the phase's published H800 GPU-hours as training time on 2,048 GPUs (the seconds are exact binary
    fractions: 2,664,000 h x 3600 / 2048 = 4,682,812.5 s)."""
    return Ledger(phase=name, attempts=[attempt(H800_GPUS, "H800", training=gpu_hours_published * 3600 / H800_GPUS)],
                  **fields)


@pytest.fixture
def deepseek(tmp_path):
    """DeepSeek-V3's cost table (arXiv 2412.19437, table 1): pre-training 2,664K, context extension 119K,
    post-training 5K H800 GPU-hours; $2 per GPU-hour. Pre-training: 14.8T tokens on the config's FLOPs/token,
    against the H800's FP8 peak (DeepSeek trained its matmuls in FP8)."""
    flops = estimate("configs/deepseek_v3.yaml", parse_tokens("14.8T"), "H800", H800_GPUS).flops
    pretrain = h800_phase("pretraining", 2_664_000, flops_per_token=flops.per_token, peak_flops=1979e12,
                          precision="fp8", tokens=flops.tokens)
    root = write_recipe(tmp_path / "deepseek_v3", [
        pretrain, h800_phase("context_extension", 119_000), h800_phase("post_training", 5_000)])
    shutil.copy("configs/deepseek_v3.yaml", root / "pretraining" / "config.yaml")
    return root


def test_deepseek_v3_case_study_json(deepseek):
    report = build_report(deepseek, price_per_gpu_hour=2.0)
    assert [r["phase"] for r in report["phases"]] == ["pretraining", "context_extension", "post_training"]
    assert [r["accelerator_hours"] for r in report["phases"]] == [2_664_000.0, 119_000.0, 5_000.0]
    assert [r["cost"] for r in report["phases"]] == [5_328_000.0, 238_000.0, 10_000.0]
    total = json.loads(format_report(report, "json"))["total"]
    assert total["accelerator_hours"] == 2_788_000.0 and total["cost"] == 5_576_000.0  # exact, not approx
    assert total["badput_share"] == 0.0 and report["unit"] == "GPU-hours"
    pretraining = report["phases"][0]
    assert pretraining["hardware"] == "2048 × H800" and pretraining["mfu"] == pytest.approx(0.2276, abs=1e-4)
    # the estimate at the default MFU 0.40 (of the FP8 peak) from config.yaml, and the measured hours against it
    assert pretraining["estimate_flops_source"] == "config.yaml"
    assert pretraining["estimate_hours"] == pytest.approx(2_664_000 * 0.2276 / 0.40, rel=1e-3)
    assert pretraining["measured_over_estimate"] == pytest.approx(0.40 / 0.2276, rel=1e-3)
    assert report["phases"][1]["mfu"] is None and report["phases"][1]["estimate_hours"] is None  # no tokens given


def test_deepseek_v3_case_study_md_and_csv(deepseek):
    report = build_report(deepseek, price_per_gpu_hour=2.0)
    md = format_report(report, "md")
    assert "Total: 2,788K GPU-hours (2,788,000), $5.576M at $2.00 per GPU-hour." in md
    assert "| **total** | | 3 | **2,788,000** |" in md and "**$5,576,000.00** |" in md
    assert "| pretraining | 2048 × H800 | 1 | 2,664,000 |" in md and "| 0.228 (fp8) | $5,328,000.00 |" in md
    assert "| context_extension | 2048 × H800 | 1 | 119,000 |" in md and "$238,000.00" in md
    assert "| post_training | 2048 × H800 | 1 | 5,000 |" in md and "$10,000.00" in md
    rows = list(csv.DictReader(io.StringIO(format_report(report, "csv"))))
    assert [r["phase"] for r in rows] == ["pretraining", "context_extension", "post_training", "total"]
    assert [float(r["accelerator_hours"]) for r in rows] == [2_664_000.0, 119_000.0, 5_000.0, 2_788_000.0]
    assert float(rows[-1]["cost"]) == 5_576_000.0 and rows[1]["mfu"] == ""


def test_split_badput_mfu_energy_and_plot_by_hand(tmp_path):
    gpu = "NVIDIA H100 80GB HBM3"
    run = Ledger(phase="pretrain", flops_per_token=6e9, peak_flops=989e12, precision="bf16",
                 tokens=1_780_200_000, steps=100, attempts=[
                     # 5,220 s x 4 = 5.8 h; then crashed: 720 s of its work lost
                     attempt(4, gpu, 1, startup=360, training=3600, evaluation=360, checkpoint_save=180,
                             badput_lost=720),
                     # 2,016 s x 4 = 2.24 h, its start-up and checkpoint load are the restart's cost
                     attempt(4, gpu, 2, badput_restart=180, training=1800, other=36)])
    cpu = Ledger(phase="sft", attempts=[attempt(1, "CPU process (test CPU, 2 cores on the machine)",
                                                startup=36, training=36)])
    root = write_recipe(tmp_path / "recipe", [run, cpu])
    report = build_report(root, price_per_gpu_hour=3.0, pue=1.1, grid_kgco2_per_kwh=0.4)
    r, c, total = *report["phases"], report["total"]
    assert r["accelerator_hours"] == pytest.approx(8.04)
    assert r["productive_hours"] == pytest.approx((3600 + 1800) * 4 / 3600)  # 6.0
    assert r["overhead_hours"] == pytest.approx((360 + 360 + 180 + 36) * 4 / 3600)  # 1.04
    assert r["badput_hours"] == pytest.approx((720 + 180) * 4 / 3600)  # 1.0
    assert r["badput_share"] == pytest.approx(1.0 / 8.04)
    # 1.7802e9 tokens x 6e9 FLOPs = half of 6.0 training hours at 989 TFLOP/s: MFU 0.5 over the steps,
    # 0.5 x 6.0 / 8.04 over every hour; at the assumed 0.40 the estimate is 6.0 x 0.5 / 0.4 = 7.5 hours
    assert r["training_mfu"] == pytest.approx(0.5) and r["mfu"] == pytest.approx(0.5 * 6.0 / 8.04)
    assert r["estimate_flops_source"] == "ledger" and r["estimate_hours"] == pytest.approx(7.5)
    assert r["measured_over_estimate"] == pytest.approx(8.04 / 7.5)
    # an estimate at the ledger's own MFU reproduces the measured hours: the two modules agree on the arithmetic
    assert gpu_hours(run.tokens * run.flops_per_token, run.peak_flops, run.mfu()) == pytest.approx(8.04)
    assert r["cost"] == pytest.approx(3.0 * 8.04) and c["cost"] == pytest.approx(3.0 * 0.02)
    assert r["energy_kwh"] == pytest.approx(8.04 * 0.700 * 1.1)  # H100 SXM: 700 W
    assert r["co2_tonnes"] == pytest.approx(8.04 * 0.700 * 1.1 * 0.4 / 1000)
    assert c["energy_kwh"] is None and total["energy_kwh"] is None  # a CPU process has no TDP in the table
    assert any("give --tdp-watts" in n for n in report["notes"])
    assert report["unit"] == "accelerator-hours" and c["unit"] == "process-hours"
    assert total["accelerator_hours"] == pytest.approx(8.06) and total["badput_hours"] == pytest.approx(1.0)
    md = format_report(report, "md")
    assert "| sft | 1 × CPU process (test CPU, 2 cores on the machine) | 1 | 0.02 |" in md
    assert "On CPU an accelerator is a process" in md and "- pretrain: 6.19 kWh, 0.002476 t CO2" in md

    fig = plot_report(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    drawn = [cat for cat in CATEGORIES if any(ph[f"{cat}_hours"] for ph in report["phases"])]
    assert len(drawn) == 7 and len(ax.containers) == 7  # not checkpoint_load  # one stack per category with any hours
    assert all(len(bars) == 2 for bars in ax.containers)  # a bar per phase in each
    stacks = [sum(bars[i].get_height() for bars in ax.containers) for i in range(2)]
    assert stacks == pytest.approx([8.04, 0.02])  # the stacks add up to each phase's hours
    assert ax.containers[-1][0].get_y() + ax.containers[-1][0].get_height() == pytest.approx(8.04)  # stacked
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [c.replace("_", " ") for c in drawn]


def test_write_cost_report_and_a_ledger_file(deepseek):
    md, png = write_cost_report(deepseek / "pretraining", price_per_gpu_hour=2.0)
    assert (md, png) == (deepseek / "pretraining" / REPORT_MD, deepseek / "pretraining" / REPORT_PNG)
    assert md.read_text().startswith(f"# Cost report: {deepseek / 'pretraining'}")
    assert png.read_bytes()[:8] == PNG_MAGIC
    # a ledger file given directly finds its config.yaml beside it
    report = build_report(deepseek / "pretraining" / LEDGER_FILE)
    assert report["phases"][0]["estimate_flops_source"] == "config.yaml" and report["total"]["cost"] is None


def test_cli_report_formats_and_plot(deepseek, tmp_path):
    plot = tmp_path / "cost.png"
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "cost", "report", str(deepseek), "--format", "json",
                          "--price-per-gpu-hour", "2", "--plot", str(plot)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    total = json.loads(out.stdout)["total"]
    assert total["accelerator_hours"] == 2_788_000.0 and total["cost"] == 5_576_000.0
    assert plot.read_bytes()[:8] == PNG_MAGIC and f"plot -> {plot}" in out.stderr
    assert main(["cost", "report", str(deepseek), "--format", "csv", "--out", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().splitlines()[-1].startswith("total,,GPU-hours,3,2788000.0,")


def test_bad_report_input(tmp_path, capsys):
    # main() prints ConfigError as one line and returns 2 (test_cost_estimate runs a bad input as a subprocess)
    assert main(["cost", "report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: config error at 'RUN_DIR': {tmp_path / 'missing'} does not exist: give a run folder, a recipe folder "
        "or an accounting.json"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / LEDGER_FILE).write_text("{not json")
    for folder, message in [("empty", "holds no accounting.json"), ("broken", "is not a readable accounting ledger")]:
        assert main(["cost", "report", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    ledger = tmp_path / "run"
    write_recipe(ledger, [h800_phase("p", 1)])
    assert main(["cost", "report", str(ledger), "--price-per-gpu-hour", "-1"]) == 2
    assert main(["cost", "report", str(ledger), "--plot", str(tmp_path / "broken" / LEDGER_FILE / "x.png")]) == 2
    assert "'--plot': cannot write" in capsys.readouterr().err
    assert lookup("H800").tdp_watts == 700
