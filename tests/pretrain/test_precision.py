"""train.precision=auto follows the hardware (the capability probe is faked for both branches); an explicit bf16
on a CPU without native bf16 warns with the measured slowdown; the choice reaches the run's summary and config."""

import json
import warnings

import pytest
import torch
import yaml

from pretrain.config import load_config
from pretrain.precision import CpuFeatures, SlowPrecisionWarning, choose_precision
from pretrain.trainer import Trainer

CPU = torch.device("cpu")
AMX = CpuFeatures(amx=True, avx512_bf16=True)
AVX512_BF16 = CpuFeatures(amx=False, avx512_bf16=True)
AVX2 = CpuFeatures(amx=False, avx512_bf16=False)


@pytest.mark.parametrize("cpu", [AMX, AVX512_BF16])
def test_auto_picks_bf16_on_cpus_with_native_bf16(cpu):
    choice = choose_precision("auto", CPU, cpu)
    assert choice.precision == "bf16"
    assert ("AMX" if cpu.amx else "AVX512-BF16") in choice.reason


def test_auto_picks_fp32_on_an_avx2_only_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        choice = choose_precision("auto", CPU, AVX2)
    assert choice.precision == "fp32"
    assert "neither AMX nor AVX512-BF16" in choice.reason


def test_onednn_isa_cap_below_bf16_counts_as_not_native():
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine makes bf16 matmul emulated: auto must not pick bf16 there."""
    capped = CpuFeatures(amx=True, avx512_bf16=True, onednn_max_isa="AVX2")
    choice = choose_precision("auto", CPU, capped)
    assert choice.precision == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in choice.reason
    uncapped = CpuFeatures(amx=True, avx512_bf16=True, onednn_max_isa="AVX512_CORE_AMX")
    assert choose_precision("auto", CPU, uncapped).precision == "bf16"


def test_explicit_bf16_without_native_support_warns_with_the_measured_slowdown():
    with pytest.warns(SlowPrecisionWarning, match=r"runs \d+x slower than fp32 here \(measured\)"):
        choice = choose_precision("bf16", CPU, AVX2)
    assert choice.precision == "bf16"  # honoured, only warned about


def test_explicit_choices_are_kept_without_warnings_where_native():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision("bf16", CPU, AMX).precision == "bf16"
        assert choose_precision("fp32", CPU, AMX).precision == "fp32"
        assert choose_precision("fp32", CPU, AVX2).precision == "fp32"


def test_real_probe_agrees_with_torch():
    """The probe reads torch's own CPU feature detection (whatever this machine has)."""
    probe = CpuFeatures.probe()
    assert probe.amx == torch.cpu._is_amx_tile_supported()
    assert probe.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()


def test_run_records_the_choice(tiny_overrides, tmp_path, monkeypatch):
    """The trainer resolves auto once: the summary and the written config say what the run computed in, and the
    MFU denominator is the peak of that precision."""
    monkeypatch.setattr(CpuFeatures, "probe", classmethod(lambda cls: AVX2))
    cfg = load_config(None, [*tiny_overrides, "train.precision=auto", "train.steps=1", "train.eval_batches=1",
                             "tracking.mlflow=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.fit()
    assert summary["precision"] == "fp32" and summary["precision_requested"] == "auto"
    assert "neither AMX nor AVX512-BF16" in summary["precision_reason"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == "fp32"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["precision"] == "fp32"
    from pretrain.hardware import peak_flops

    assert summary["peak_flops"] == peak_flops(CPU, "fp32")

    monkeypatch.setattr(CpuFeatures, "probe", classmethod(lambda cls: AMX))
    trainer = Trainer(cfg, tmp_path / "run_amx")
    assert trainer.precision.precision == "bf16" and trainer.cfg.train.precision == "bf16"
    assert trainer.peak_flops == peak_flops(CPU, "bf16")


AVX2_IMITATION = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_cli_trains_under_the_avx2_imitation(tiny_overrides, tmp_path):
    """What a newcomer on an AVX2-only CPU runs: the tiny config (precision auto) through `pretrain train`, with
    oneDNN and ATen capped at AVX2 (on an AVX2 machine the caps change nothing). Auto must pick fp32 and say why,
    and the short run must train (loss finite and falling)."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "avx2"
    overrides = [o for o in tiny_overrides if not o.startswith("train.precision")]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir), *overrides,
           "train.steps=6", "train.log_every=1", "train.eval_every=6", "train.eval_batches=1", "optim.lr=1e-2",
           "tracking.mlflow=false"]
    done = subprocess.run(cmd, env={**os.environ, **AVX2_IMITATION}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision fp32 (chosen by train.precision=auto" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["precision_requested"] == "auto"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]
